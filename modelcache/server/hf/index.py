"""The Hugging Face mirror's view of the registry, in memory, and the names it is asked by.

A model ``vendor/name`` (or ``name`` without a vendor) is a repo; each of its
safetensors artifacts is a revision, addressed three ways: by its version,
by ``main`` (the newest promoted version), or by a commit id, the first 40
hex digits of the artifact's digest. Commit ids are stable (the same
content always has the same one) and name exactly one artifact.

Every file is presented as a Git LFS file, because that is what a sha256
ETag means to the client: ``lfs.oid`` is its sha256, and ``oid`` is the Git
blob id of its LFS pointer, computed from the sha256 and the size alone.

The view is loaded at start and then follows the blob catalog
(``Catalog.follow``, one LISTEN connection for both): when blobs change, the
models holding them are read again (also when the catalog catches up on changes
it missed); after a full reload of the catalog, everything is. While PostgreSQL is down the last view keeps serving, so HEAD and the
metadata endpoints never wait on the database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from itertools import groupby
from typing import Iterable

from ...auth import Subject
from ...db import Database
from ...db import hf as queries
from ...digest import Digest
from ...errors import DatabaseUnavailable, InvalidInput, NotFound
from ...names import parse_model_name, parse_vendor, parse_version

logger = logging.getLogger(__name__)

MAIN = "main"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MAX_PATH = 4096


# -- errors the Hugging Face client tells apart (by X-Error-Code) -------------


class HfNotFound(NotFound):
    """A 404 whose kind the client reads from ``X-Error-Code``."""

    code = ""

    def __init__(self, detail: str, commit: str | None = None) -> None:
        super().__init__(detail)
        self.commit = commit  # sent as X-Repo-Commit (the client caches an EntryNotFound under it)


class RepoNotFound(HfNotFound):
    code = "RepoNotFound"


class RevisionNotFound(HfNotFound):
    code = "RevisionNotFound"


class EntryNotFound(HfNotFound):
    code = "EntryNotFound"


# -- names, parsed at the edge -------------------------------------------------


@dataclass(frozen=True, slots=True)
class RepoId:
    """``vendor/name``, or ``name`` for a model without a vendor."""

    vendor: str | None
    name: str

    @classmethod
    def parse(cls, vendor: str | None, name: str) -> "RepoId":
        return cls(parse_vendor(vendor) if vendor is not None else None, parse_model_name(name))

    def __str__(self) -> str:
        return f"{self.vendor}/{self.name}" if self.vendor else self.name


@dataclass(frozen=True, slots=True)
class Revision:
    """What a client names a revision by: ``main``, a version, or a 40-hex commit id."""

    text: str

    @classmethod
    def parse(cls, text: str) -> "Revision":
        if text != MAIN and not _COMMIT.fullmatch(text):
            try:
                parse_version(text)
            except InvalidInput:
                raise RevisionNotFound(f"invalid revision {_shown(text)}: expected main, a version or a 40-hex "
                                       "commit id") from None
        return cls(text)

    @property
    def is_commit(self) -> bool:
        return _COMMIT.fullmatch(self.text) is not None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class RepoPath:
    """A file or folder path inside a repo: relative, ``/``-separated, no empty, ``.`` or ``..`` part,
    no backslash, NUL or other control character. Rejected, never repaired."""

    text: str

    @classmethod
    def parse(cls, text: str) -> "RepoPath":
        problem = None
        if not text:
            problem = "it is empty"
        elif len(text) > _MAX_PATH:
            problem = f"it is longer than {_MAX_PATH} characters"
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            problem = "it holds a control character"
        elif "\\" in text:
            problem = "it holds a backslash"
        elif text.startswith("/"):
            problem = "it is absolute"
        elif any(part in ("", ".", "..") for part in text.split("/")):
            problem = "it has an empty, '.' or '..' part"
        if problem:
            raise InvalidInput(f"invalid path {_shown(text)} in repo: {problem}")
        return cls(text)

    def __str__(self) -> str:
        return self.text


def commit_id(artifact_sha256: str) -> str:
    """The commit id a revision is known by to clients: the first 40 hex digits of its digest."""
    return artifact_sha256[:40]


# -- the view ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HfFile:
    path: str
    digest: Digest
    size: int
    oid: str  # the Git blob id of the file's LFS pointer
    pointer_size: int

    @classmethod
    def of(cls, path: str, digest: Digest, size: int) -> "HfFile":
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest.hex}\nsize {size}\n".encode()
        oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        return cls(path, digest, size, oid, len(pointer))


@dataclass(frozen=True, slots=True)
class HfFolder:
    path: str
    oid: str


@dataclass(frozen=True)
class HfRevision:
    """One safetensors artifact of a model version, and its files."""

    artifact_id: uuid.UUID
    version: str
    state: str  # staged, promoted, evicted, quarantined (model_artifacts.state)
    commit: str
    created_at: dt.datetime
    files: tuple[HfFile, ...]  # in path order
    by_path: dict[str, HfFile] = field(init=False, repr=False, compare=False)
    folders: tuple[HfFolder, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {f.path: f for f in self.files})
        names = sorted({"/".join(parts[:i]) for parts in (f.path.split("/") for f in self.files)
                        for i in range(1, len(parts))})
        folders = tuple(HfFolder(n, hashlib.sha1(f"tree {self.commit}/{n}".encode()).hexdigest()) for n in names)
        object.__setattr__(self, "folders", folders)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def hidden_from(self, subject: Subject) -> str | None:
        """Why this subject may not have this revision, or None if it may."""
        return subject.withheld(self.state)

    def file(self, path: RepoPath, repo: "HfRepo") -> HfFile:
        found = self.by_path.get(path.text)
        if found is None:
            raise EntryNotFound(f"{repo.repo_id} has no file {_shown(path.text)} at revision {self.version} "
                                f"(commit {self.commit})", commit=self.commit)
        return found

    def entries(self, under: RepoPath | None, recursive: bool) -> list[HfFile | HfFolder]:
        """Files and folders below ``under`` (the root if None), in path order; only the direct
        children unless ``recursive``."""
        prefix = f"{under.text}/" if under else ""
        if under is not None and not any(d.path == under.text for d in self.folders):
            raise EntryNotFound(f"no folder {_shown(under.text)} at revision {self.version} (commit {self.commit})",
                                commit=self.commit)
        found: list[HfFile | HfFolder] = []
        for entry in (*self.folders, *self.files):
            if entry.path.startswith(prefix) and (recursive or "/" not in entry.path[len(prefix):]):
                found.append(entry)
        found.sort(key=lambda e: e.path)
        return found


@dataclass(frozen=True)
class HfRepo:
    repo_id: RepoId
    model_id: uuid.UUID
    revisions: tuple[HfRevision, ...]  # newest version first, then newest artifact of a version

    def visible_to(self, subject: Subject) -> bool:
        return any(r.hidden_from(subject) is None for r in self.revisions)

    def resolve(self, revision: Revision, subject: Subject) -> HfRevision:
        """The revision a client means, if this subject may have it; else RevisionNotFound saying why.

        A commit id names one artifact; a version names the newest artifact of that version the
        subject may have (a version literally called ``main`` is found as such); ``main`` is the
        newest promoted version.
        """
        if revision.is_commit:
            for r in self.revisions:
                if r.commit == revision.text:
                    return self._allowed(r, subject, f"commit {r.commit} (version {r.version})")
        named = [r for r in self.revisions if r.version == revision.text]
        if named:
            for r in named:
                if r.hidden_from(subject) is None:
                    return r
            return self._allowed(named[0], subject, f"version {revision.text}")
        if revision.text == MAIN:
            for r in self.revisions:
                if r.state == "promoted":
                    return r
            raise RevisionNotFound(f"{self.repo_id} has no promoted version, so no main; versions: "
                                   f"{self._versions_with_states()}")
        versions = ", ".join(dict.fromkeys(r.version for r in self.revisions if r.hidden_from(subject) is None))
        raise RevisionNotFound(f"{self.repo_id} has no revision {_shown(revision.text)}: revisions are main, "
                               f"a version ({versions or 'none you may read'}) or a 40-hex commit id")

    def branches(self, subject: Subject) -> list[tuple[str, HfRevision]]:
        """The names this subject may resolve, each with the revision :meth:`resolve` gives it:
        ``main`` first (if there is a promoted version), then the versions, newest first."""
        found = []
        for name in dict.fromkeys((MAIN, *(r.version for r in self.revisions))):
            try:
                found.append((name, self.resolve(Revision(name), subject)))
            except RevisionNotFound:
                continue  # hidden from this subject (staged, evicted, quarantined), or no main
        return found

    def _allowed(self, r: HfRevision, subject: Subject, what: str) -> HfRevision:
        reason = r.hidden_from(subject)
        if reason is not None:
            raise RevisionNotFound(f"{what} of {self.repo_id} {reason}")
        return r

    def _versions_with_states(self) -> str:
        return ", ".join(f"{r.version} ({r.state})" for r in self.revisions) or "none"


class HfIndex:
    """Repos by id, answered from memory; see the module's docstring for how it stays current."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.repos: dict[RepoId, HfRepo] = {}

    # -- reads on the hot path ------------------------------------------------

    def repo(self, repo_id: RepoId, subject: Subject) -> HfRepo:
        """The repo, if the subject may read at least one of its revisions (a model that is only
        staged is not there for nodes and readers)."""
        found = self.repos.get(repo_id)
        if found is None:
            raise RepoNotFound(f"no model {repo_id} with safetensors files in the cache")
        if not found.visible_to(subject) and all(r.state == "staged" for r in found.revisions):
            raise RepoNotFound(f"model {repo_id} has only staged versions: only admins and operators may read them")
        return found

    def knows(self, repo_id: RepoId, revision: Revision) -> bool:
        """Whether the registry has a revision of this name in any state (``main``: any revision): a 404
        for it is not a miss to fetch (pull-through) but the cache's answer (staged, evicted)."""
        found = self.repos.get(repo_id)
        if found is None:
            return False
        return (revision.text == MAIN and bool(found.revisions)) or any(
            revision.text in (r.version, r.commit) for r in found.revisions)

    # -- loading --------------------------------------------------------------

    async def reload(self) -> None:
        async with self._db.connection() as conn:
            rows = await queries.revision_files(conn)
        self.repos = {repo.repo_id: repo for repo in _build(rows)}

    async def _reload_holding(self, digests: list[str]) -> None:
        async with self._db.connection() as conn:
            rows = await queries.revision_files_holding(conn, digests)
        fresh = {repo.model_id: repo for repo in _build(rows)}
        wanted = set(digests)
        repos = {}
        for repo_id, repo in self.repos.items():
            # a repo that held one of these blobs and is not read again lost it (an artifact deleted)
            held = any(str(f.digest) in wanted for r in repo.revisions for f in r.files)
            if repo.model_id not in fresh and not held:
                repos[repo_id] = repo
        for repo in fresh.values():
            repos[repo.repo_id] = repo
        self.repos = repos

    async def update(self, digests: list[str] | None) -> None:
        """Follow the blob catalog (``Catalog.follow``): reload the repos holding these blobs, or all."""
        try:
            if digests is None:
                await self.reload()
            else:
                await self._reload_holding(digests)
        except DatabaseUnavailable as exc:  # the catalog's next catch-up (at most a minute) tells us again
            logger.warning("hf index update failed, serving the last view: %s", exc.detail)


def _build(rows: Iterable[dict]) -> list[HfRepo]:
    """Repos from rows grouped by model, then by artifact (newest first), files in path order."""
    repos = []
    for model_id, model_rows in groupby(rows, key=lambda r: r["model_id"]):
        revisions = []
        for _, artifact_rows in groupby(model_rows, key=lambda r: r["artifact_id"]):
            files = list(artifact_rows)
            first = files[0]
            revisions.append(HfRevision(
                first["artifact_id"], first["version"], first["state"], commit_id(first["sha256"]),
                first["created_at"],
                tuple(HfFile.of(f["path"], Digest.parse(f["blob_digest"]), f["size_bytes"]) for f in files)))
        repos.append(HfRepo(RepoId(first["vendor"], first["name"]), model_id, tuple(revisions)))
    return repos


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 100 else f"{text[:100]!r}..."
