"""``/v2``'s view of the registry, in memory: repositories, tags, and the manifests they name.

A repository ``<namespace>/<model>`` is a registry model (namespace = vendor,
``library`` for none; matched ignoring case, since OCI names are lower case);
a tag is a version. Of a version's artifacts, an ``ollama`` one is preferred
(its manifest is served byte for byte), then a ``gguf`` one, whose Ollama
model was synthesised; promoted before staged, newest first. Staged ones are
there only for admins and operators.

Each artifact's manifests (Docker v2 and OCI, see ``modelcache/manifests.py``,
which makes them when their inputs change) are held here as bytes, with
their digests and media types. A manifest GET or HEAD, ``tags/list`` and
``_catalog`` answer from here alone: they write nothing and run no SQL.

The view is loaded at start and then follows the blob catalog
(``Catalog.follow``, one LISTEN connection for all views): when blobs change,
the models holding them are read again (also when the catalog catches up on
changes it missed); after a full reload of the catalog, everything is.
Manifest bytes are read from the store then, never per request; blobs never
change, so bytes already held are kept by digest. While PostgreSQL is down
the last view keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import uuid
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterable

from ...auth import Subject
from ...db import Database
from ...db import oci as queries
from ...digest import Digest
from ...errors import DatabaseUnavailable, Forbidden, InvalidInput, ModelcacheError, NotFound
from ...formats import DOCKER_MANIFEST_V2
from ...formats.ollama import OCI_MANIFEST
from ...manifests import read_manifest
from ...store import BlobStore

logger = logging.getLogger(__name__)

MANIFEST_TYPES = queries.MANIFEST_TYPES  # in the order of preference when the client names neither

# The OCI distribution grammar (distribution-spec, "Pulling manifests").
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
MAX_NAME = 255


class NameInvalid(InvalidInput):
    code = "NAME_INVALID"


class NameUnknown(NotFound):
    code = "NAME_UNKNOWN"


class ManifestUnknown(NotFound):
    code = "MANIFEST_UNKNOWN"


# -- names, parsed at the edge --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Repository:
    namespace: str
    model: str

    @classmethod
    def parse(cls, name: str) -> "Repository":
        """A repository name per the OCI grammar, of the two parts modelcache has: namespace and model."""
        shown = name if len(name) <= 100 else f"{name[:100]}..."
        if len(name) > MAX_NAME or not _NAME.fullmatch(name):
            raise NameInvalid(f"invalid repository name {shown!r}: expected lower-case components "
                              "[a-z0-9]+ joined by . _ __ or -, separated by /, at most 255 characters")
        parts = name.split("/")
        if len(parts) != 2:
            raise NameUnknown(f"no repository {shown}: repositories are <namespace>/<model>, where the namespace "
                              "is the model's vendor, or library when it has none")
        return cls(parts[0], parts[1])

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}"


def repository_name(name: str, vendor: str | None) -> str | None:
    """The repository a registry model is served as, or None if its name does not fit the OCI grammar."""
    text = f"{(vendor or 'library').lower()}/{name.lower()}"
    return text if len(text) <= MAX_NAME and _NAME.fullmatch(text) else None


def is_tag(text: str) -> bool:
    return bool(_TAG.fullmatch(text))


# -- the view -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServedManifest:
    media_type: str
    data: bytes
    digest: Digest


@dataclass(frozen=True, eq=False)
class OciArtifact:
    """One ollama or gguf artifact of a version, and its manifests by media type (none: not made yet)."""

    artifact_id: uuid.UUID
    artifact_type: str
    version: str
    state: str  # staged, promoted, evicted, quarantined (model_artifacts.state)
    created_at: dt.datetime
    manifests: dict[str, ServedManifest]

    def holds(self, digest: Digest) -> ServedManifest | None:
        return next((m for m in self.manifests.values() if m.digest == digest), None)


@dataclass(frozen=True)
class OciRepo:
    """One model's ollama and gguf artifacts, newest first."""

    model_id: uuid.UUID
    name: str | None  # the repository name; None if the model's name does not fit the OCI grammar
    label: str  # vendor/name as registered, for messages
    artifacts: tuple[OciArtifact, ...]


class OciIndex:
    """Repositories by name, answered from memory; see the module's docstring for how it stays current."""

    def __init__(self, db: Database, store: BlobStore) -> None:
        self._db = db
        self._store = store
        self.repos: dict[uuid.UUID, OciRepo] = {}
        self._by_name: dict[str, list[OciRepo]] = {}

    # -- reads on the hot path ------------------------------------------------

    def by_tag(self, repo: Repository, tag: str, subject: Subject,
               choose: Callable[[list[str]], str | None]) -> ServedManifest:
        """The manifest ``repo:tag`` names, in the representation ``choose`` picks from those there are."""
        artifact = _pick([a for a in self._repo(repo).artifacts if a.version == tag], subject, f"{repo}:{tag}")
        media_type = choose([t for t in MANIFEST_TYPES if t in artifact.manifests])
        if media_type is None:
            raise ManifestUnknown(f"the manifest of {repo}:{tag} is "
                                  f"{' or '.join(t for t in MANIFEST_TYPES if t in artifact.manifests)}, "
                                  "and the Accept header allows neither")
        return artifact.manifests[media_type]

    def by_digest(self, repo: Repository, digest: Digest, subject: Subject) -> ServedManifest:
        """The manifest of ``digest`` in ``repo``: those exact bytes with their own media type.

        The Accept header does not matter here: a digest names one
        representation, and a client asking by digest wants those bytes
        (distribution's conformance tests ask for a Docker manifest by digest
        with an OCI-only Accept).
        """
        held = {a: m for a in self._repo(repo).artifacts if (m := a.holds(digest)) is not None}
        return held[_pick(list(held), subject, f"{repo}@{digest}")]

    def tags(self, repo: Repository, subject: Subject) -> list[str]:
        """The repository's tags this subject may pull, sorted; NameUnknown if it has none."""
        found = sorted({a.version for a in self._repo(repo).artifacts if _visible(a, subject) and is_tag(a.version)})
        if not found:
            raise NameUnknown(f"no repository {repo}: the model has no Ollama or GGUF artifact you may pull")
        return found

    def knows(self, repo: Repository, tag: str) -> bool:
        """Whether the registry has an artifact of ``repo:tag`` in any state: a 404 for it is not a miss
        to fetch (pull-through) but the cache's answer (staged, evicted, no manifest yet)."""
        return any(a.version == tag for r in self._by_name.get(str(repo), []) for a in r.artifacts)

    def repositories(self, subject: Subject) -> list[str]:
        return sorted({r.name for r in self.repos.values()
                       if r.name is not None and any(_visible(a, subject) for a in r.artifacts)})

    def _repo(self, repo: Repository) -> OciRepo:
        found = self._by_name.get(str(repo), [])
        if not found:
            raise NameUnknown(f"no repository {repo}: no model {repo.model!r} of vendor {repo.namespace!r}"
                              + (" (or without vendor)" if repo.namespace == "library" else ""))
        if len(found) > 1:
            names = ", ".join(sorted(r.label for r in found))
            raise NameUnknown(f"repository {repo} is ambiguous: it matches the models {names}, whose names differ "
                              "only in case; rename one of them")
        return found[0]

    # -- loading --------------------------------------------------------------

    async def reload(self) -> None:
        async with self._db.connection() as conn:
            rows = await queries.index_rows(conn)
        built = await asyncio.to_thread(_build, rows, self._store, self._known())
        self._set({repo.model_id: repo for repo in built})

    async def _reload_holding(self, digests: list[str]) -> None:
        async with self._db.connection() as conn:
            rows = await queries.index_rows_holding(conn, digests)
        fresh = {repo.model_id: repo for repo in await asyncio.to_thread(_build, rows, self._store, self._known())}
        wanted = set(digests)
        repos = {}
        for model_id, repo in self.repos.items():
            # a model that held one of these blobs and is not read again lost it (an artifact deleted)
            held = any(str(m.digest) in wanted for a in repo.artifacts for m in a.manifests.values())
            if model_id not in fresh and not held:
                repos[model_id] = repo
        repos.update(fresh)
        self._set(repos)

    async def update(self, digests: list[str] | None) -> None:
        """Follow the blob catalog (``Catalog.follow``): reload the models holding these blobs, or all."""
        try:
            if digests is None:
                await self.reload()
            else:
                await self._reload_holding(digests)
        except DatabaseUnavailable as exc:  # the catalog's next catch-up (at most a minute) tells us again
            logger.warning("oci index update failed, serving the last view: %s", exc.detail)

    def _set(self, repos: dict[uuid.UUID, OciRepo]) -> None:
        by_name: dict[str, list[OciRepo]] = {}
        for repo in repos.values():
            if repo.name is not None:
                by_name.setdefault(repo.name, []).append(repo)
        self.repos, self._by_name = repos, by_name  # one assignment each: readers see old or new

    def _known(self) -> dict[Digest, bytes]:
        return {m.digest: m.data for r in self.repos.values() for a in r.artifacts for m in a.manifests.values()}


def _visible(artifact: OciArtifact, subject: Subject) -> bool:
    return bool(artifact.manifests) and subject.withheld(artifact.state) is None


def _pick(artifacts: list[OciArtifact], subject: Subject, what: str) -> OciArtifact:
    """The artifact to serve: ollama before gguf, promoted before staged, newest first."""
    candidates = [a for a in artifacts if _visible(a, subject)]
    if not candidates:
        staged = next((a for a in artifacts if a.state == "staged" and a.manifests), None)
        if staged is not None:
            raise Forbidden(f"{what} {subject.withheld(staged.state)}")
        states = sorted({a.state for a in artifacts})
        raise ManifestUnknown(f"no manifest {what}" + (f": its artifact is {', '.join(states)}" if states else ""))
    return min(candidates, key=lambda a: (a.artifact_type != "ollama", a.state != "promoted"))


def _build(rows: Iterable[dict], store: BlobStore, known: dict[Digest, bytes]) -> list[OciRepo]:
    """Repos from rows grouped by model, artifacts newest first (blocking: reads manifests not yet known)."""
    repos = []
    for model_id, model_rows in groupby(rows, key=lambda r: r["model_id"]):
        model_rows = list(model_rows)
        first = model_rows[0]
        artifacts = tuple(OciArtifact(r["artifact_id"], r["artifact_type"], r["version"], r["state"],
                                      r["created_at"], _manifests(r, store, known)) for r in model_rows)
        label = f"{first['vendor']}/{first['name']}" if first["vendor"] else first["name"]
        repos.append(OciRepo(model_id, repository_name(first["name"], first["vendor"]), label, artifacts))
    return repos


def _manifests(row: dict, store: BlobStore, known: dict[Digest, bytes]) -> dict[str, ServedManifest]:
    """An artifact's manifests by media type, read from the store; none for one that is not servable."""
    if row["state"] not in queries.SERVABLE:
        return {}
    docker = f"sha256:{row['sha256']}" if row["artifact_type"] == "ollama" else row["docker_digest"]
    found = {}
    for media_type, text in ((DOCKER_MANIFEST_V2, docker), (OCI_MANIFEST, row["oci_digest"])):
        if text is None:
            continue
        digest = Digest.parse(text)
        data = known.get(digest)
        if data is None:
            try:
                data = read_manifest(store, digest)
            except ModelcacheError as exc:
                logger.error("artifact %s: its %s manifest is not served: %s", row["artifact_id"], media_type,
                             exc.detail)
                continue
        found[media_type] = ServedManifest(media_type, data, digest)
    if DOCKER_MANIFEST_V2 not in found:  # just registered: the import makes them next
        logger.debug("artifact %s (%s, sha256:%s) has no Ollama manifest yet: /v2 does not serve it until it "
                       "is made", row["artifact_id"], row["artifact_type"], row["sha256"])
    return found
