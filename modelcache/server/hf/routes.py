"""The Hugging Face mirror under ``/hf``: with ``HF_ENDPOINT=http://HOST:12085/hf``, huggingface_hub
(``snapshot_download``, ``hf_hub_download``, ``hf download``, ``list_repo_refs``) pulls from the cache,
and so does llama.cpp's ``-hf vendor/name`` (refs, then the tree at that commit, then ``resolve``).

==================================================  ==================================================
``GET /hf/api/models/{repo}[/revision/{rev}]``      model info: ``id``, ``sha`` (the commit id), ``siblings``
``GET /hf/api/models/{repo}/refs``                  branches: ``main`` and each version, with its commit id
``GET /hf/api/models/{repo}/tree/{rev}[/{path}]``   files and folders (``?recursive=true``), paged by
                                                    ``Link: <...>; rel="next"`` (``limit``, ``cursor``)
``HEAD``/``GET /hf/{repo}/resolve/{rev}/{path}``    a file: ranges, ``X-Repo-Commit``, ``ETag`` = its sha256
==================================================  ==================================================

``{repo}`` is ``vendor/name`` (or ``name`` for a model without a vendor); revisions and commit ids are
described in ``index.py``. Every answer comes from memory (the index and the blob catalog), so a
HEAD never waits on the database; bytes go through :func:`~.blobs.send_blob`, with the same
promotion rules as ``/v1/blobs`` (:func:`~.blobs.servable`) and the same last-access bookkeeping.

Errors are answered the Hub's way (this module's renderer, mounted on the one error middleware in
``server/errors.py``), because the client tells them apart only by ``X-Error-Code`` and shows
``X-Error-Message``; an ``EntryNotFound`` carries ``X-Repo-Commit`` so the client can remember the file as
missing (transformers probes many optional files). No ``X-Xet-*`` header, ``Link rel="xet-auth"`` or
``xetHash`` is ever sent: any of them would send the client to Xet storage on the internet, around the cache.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Mapping, TypeVar

from aiohttp import web
from yarl import URL

from ...auth import Subject
from ...digest import Digest
from ...downloads.inflight import FLIGHTS
from ...downloads.pull_through import Miss, serve_miss
from ...errors import InvalidInput, ModelcacheError
from ..auth import authenticate
from ..blobs import denials
from ..blobs.serve import CACHE_CONTROL, send_blob, servable_blob
from ..errors import Renderer, header_text, mount
from ..paging import page_after, parse_count
from ..urls import public_base
from .index import (MAIN, HfFile, HfFolder, HfIndex, HfNotFound, HfRepo, HfRevision, RepoId, RepoNotFound, RepoPath,
                    RevisionNotFound, Revision, commit_id)
from ..keys import CATALOG, DATABASE, DIGEST, HF_INDEX, SETTINGS, STORE

logger = logging.getLogger(__name__)

T = TypeVar("T")


PAGE_LIMIT = 1000  # the Hub's own page size for tree listings


def setup(app: web.Application) -> None:
    """Mount the mirror: its index (started and stopped with the app) and its routes."""
    app[HF_INDEX] = HfIndex(app[DATABASE])
    app.cleanup_ctx.append(_index_ctx)
    mount(app, "/hf", RENDERER)
    # first: ``solo/refs`` is the refs of the vendorless ``solo``, not the model ``refs`` of vendor ``solo``
    for repo in ("{vendor}/{name}", "{name}"):
        app.router.add_get(f"/hf/api/models/{repo}/refs", refs)
    for repo in ("{vendor}/{name}", "{name}"):
        app.router.add_get(f"/hf/api/models/{repo}", model_info)
        app.router.add_get(f"/hf/api/models/{repo}/revision/{{revision}}", model_info)
        app.router.add_get(f"/hf/api/models/{repo}/tree/{{revision}}", tree)
        app.router.add_get(f"/hf/api/models/{repo}/tree/{{revision}}/{{path:.+}}", tree)
    for repo in ("{vendor}/{name}", "{name}"):
        app.router.add_get(f"/hf/{repo}/resolve/{{revision}}/{{path:.+}}", resolve)  # HEAD too


async def _index_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[HF_INDEX].reload()
    app[CATALOG].follow(app[HF_INDEX].update)
    logger.info("hf mirror: %d repos with safetensors files under /hf", len(app[HF_INDEX].repos))
    yield


# -- handlers ------------------------------------------------------------------


async def model_info(request: web.Request) -> web.StreamResponse:
    """What ``repo_info``/``model_info`` read; ``snapshot_download`` needs ``sha`` and ``siblings``."""
    asked = Asked.parse(request)
    repo, revision = await asked.find(request)
    return web.json_response(_model_json(repo, revision))


async def refs(request: web.Request) -> web.StreamResponse:
    """What ``list_repo_refs`` reads, and where llama.cpp's ``-hf`` starts: it takes the commit of
    the branch ``main`` (else the first branch), then lists the tree at that commit. Branches are
    the names this subject may resolve; there are no tags, converts or pull requests."""
    asked = Asked.parse(request)
    try:
        repo = request.app[HF_INDEX].repo(asked.repo_id, asked.subject)
    except RepoNotFound:
        repo, _ = await asked.find(request)  # a miss: pull-through of main, as for the model info
    body: dict = {
        "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": revision.commit}
                     for name, revision in repo.branches(asked.subject)],
        "converts": [],
        "tags": [],
    }
    if _flag(request.query, "include_prs"):
        body["pullRequests"] = []  # the client reads this key only when it asked for it
    return web.json_response(body)


async def tree(request: web.Request) -> web.StreamResponse:
    """What ``list_repo_tree`` reads. Later pages are linked by commit id, so a listing of ``main``
    stays one snapshot even if ``main`` moves while it is paged through."""
    asked = Asked.parse(request)
    under = RepoPath.parse(request.match_info["path"]) if "path" in request.match_info else None
    query = TreeQuery.parse(request.query)
    repo, revision = await asked.find(request)
    entries = revision.entries(under, query.recursive)
    page, more = page_after(entries, _path, query.after, query.limit)
    headers = {}
    if more:
        headers["Link"] = f'<{_next_page(request, repo, revision, under, query, page[-1].path)}>; rel="next"'
    return web.json_response([_entry_json(e) for e in page], headers=headers)


@denials.pull
async def resolve(request: web.Request) -> web.StreamResponse:
    """One file's bytes (GET) or headers (HEAD, answered from memory) for ``hf_hub_download``.

    A miss of a repository this process is still fetching is answered as soon as the file's sha256 is
    declared and the commit id it will have is known, its bytes streamed as they arrive (the Hub's LFS
    files: :func:`_file_in_flight`); a file without a declared sha256 waits for the download."""
    asked = Asked.parse(request)
    path = RepoPath.parse(request.match_info["path"])
    found = await asked.find(request, early=lambda job_id: _file_in_flight(request, job_id, asked.subject, path))
    if isinstance(found, FileInFlight):
        digest, commit = found.digest, found.commit
    else:
        repo, revision = found
        file = revision.file(path, repo)
        digest, commit = file.digest, revision.commit
    request[DIGEST] = digest
    entry = await servable_blob(request, digest, asked.subject)
    etag = f'"{digest.hex}"'  # the client keeps the file as blobs/<sha256>, as for the Hub's LFS files
    headers = {
        "ETag": etag,
        "X-Linked-Etag": etag,
        "X-Linked-Size": str(entry.size),
        "X-Repo-Commit": commit,
        # main and version names may move to another artifact; a commit id never does
        "Cache-Control": CACHE_CONTROL if asked.revision.is_commit else "no-cache",
    }
    return await send_blob(request, digest, entry.size, headers)


@dataclass(frozen=True)
class FileInFlight:
    """A file of a repository a download of this process is still fetching, and the commit id it will have."""

    digest: Digest
    commit: str


def _file_in_flight(request: web.Request, job_id: uuid.UUID, subject: Subject, path: RepoPath) -> FileInFlight | None:
    """``path`` of the download ``job_id`` while it runs here: once its upstream declared the file's sha256
    and the artifact's digest is known (every other file's sha256 declared or verified), so the commit id
    the client caches it under is the one the index will answer. None until then (the miss waits on)."""
    job = FLIGHTS.job_of(job_id)
    if job is None or job.artifact is None or subject.withheld("promoted" if job.promoted else "staged"):
        return None
    digest = job.paths.get(path.text)
    flight = FLIGHTS.file(request.app[STORE].root, digest) if digest is not None else None
    if flight is None or flight.failure is not None:
        return None
    return FileInFlight(digest, commit_id(job.artifact.hex))


@dataclass(frozen=True)
class Asked:
    """Who asks for which repo at which revision, parsed from the request before anything is looked up."""

    subject: Subject
    repo_id: RepoId
    revision: Revision

    @classmethod
    def parse(cls, request: web.Request) -> "Asked":
        subject = authenticate(request)  # first: no answer about names to whom may not ask
        return cls(subject, RepoId.parse(request.match_info.get("vendor"), request.match_info["name"]),
                   Revision.parse(request.match_info.get("revision", MAIN)))

    def look_up(self, index: HfIndex) -> tuple[HfRepo, HfRevision]:
        repo = index.repo(self.repo_id, self.subject)
        return repo, repo.resolve(self.revision, self.subject)

    async def find(self, request: web.Request, early: Callable[[uuid.UUID], T | None] | None = None
                   ) -> tuple[HfRepo, HfRevision] | T:
        """The repo and revision from the index; a miss goes through pull-through (its module says when),
        ``early`` answering it before its download completed when it can."""
        index = request.app[HF_INDEX]
        try:
            return self.look_up(index)
        except (RepoNotFound, RevisionNotFound) as exc:
            miss = None if index.knows(self.repo_id, self.revision) else Miss.of_hf(
                self.repo_id.vendor, self.repo_id.name, self.revision.text)
            if miss is None:
                raise
            return await serve_miss(request.app[DATABASE], request.app[SETTINGS], miss, self.subject,
                                    lambda: self.look_up(index), exc, early)


# -- query parameters of the tree listing -----------------------------------------


@dataclass(frozen=True)
class TreeQuery:
    recursive: bool = False
    limit: int = PAGE_LIMIT
    after: str | None = None  # the last path of the previous page, from the opaque cursor

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> "TreeQuery":
        """``recursive`` and ``expand`` (accepted, ignored: there is no commit history to expand),
        ``limit`` and ``cursor``; other parameters the Hub knows are ignored as the Hub does."""
        _flag(query, "expand")
        limit = query.get("limit")
        cursor = query.get("cursor")
        return cls(_flag(query, "recursive"), parse_count(limit, "limit", 1, PAGE_LIMIT) if limit else PAGE_LIMIT,
                   _decode_cursor(cursor) if cursor else None)


def _path(entry: HfFile | HfFolder) -> str:
    return entry.path


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value not in ("true", "1", "false", "0"):
        raise InvalidInput(f"invalid {name} {value[:20]!r}: expected true or false")
    return value in ("true", "1")


def _encode_cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput(f"invalid cursor {cursor[:40]!r}: follow the Link of the previous page") from None


def _next_page(request: web.Request, repo: HfRepo, revision: HfRevision, under: RepoPath | None,
               query: TreeQuery, last: str) -> str:
    # absolute: the client requests the Link as given
    path = f"/hf/api/models/{repo.repo_id}/tree/{revision.commit}" + (f"/{under}" if under else "")
    params = {"recursive": "true" if query.recursive else "false", "cursor": _encode_cursor(last)}
    if query.limit != PAGE_LIMIT:
        params["limit"] = str(query.limit)
    return str(URL(public_base(request) + path).with_query(params))


# -- JSON shapes the client reads -------------------------------------------------


def _model_json(repo: HfRepo, revision: HfRevision) -> dict:
    return {
        "id": str(repo.repo_id),
        "modelId": str(repo.repo_id),
        "author": repo.repo_id.vendor,
        "sha": revision.commit,
        "lastModified": _timestamp(revision.created_at),
        "createdAt": _timestamp(revision.created_at),
        "gated": False,
        "disabled": False,
        "tags": ["safetensors"],
        "usedStorage": revision.size,
        "siblings": [
            {"rfilename": f.path, "size": f.size, "blobId": f.oid,
             "lfs": {"sha256": f.digest.hex, "size": f.size, "pointerSize": f.pointer_size}}
            for f in revision.files
        ],
    }


def _entry_json(entry: HfFile | HfFolder) -> dict:
    if isinstance(entry, HfFolder):
        return {"type": "directory", "oid": entry.oid, "size": 0, "path": entry.path}
    return {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path,
            "lfs": {"oid": entry.digest.hex, "size": entry.size, "pointerSize": entry.pointer_size}}


def _timestamp(at: dt.datetime) -> str:
    """The Hub's one date format, ``2024-05-01T12:00:00.000Z`` (the client parses no other)."""
    at = at.astimezone(dt.timezone.utc)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


# -- errors, the Hub's way ----------------------------------------------------------


def _error(request: web.Request, exc: ModelcacheError) -> web.Response:
    """The client tells errors apart only by ``X-Error-Code`` and shows ``X-Error-Message``; an
    ``EntryNotFound`` carries ``X-Repo-Commit`` so the client can remember the file as missing."""
    headers = {"X-Error-Message": header_text(exc.detail)}
    if isinstance(exc, HfNotFound):
        headers["X-Error-Code"] = exc.code
        if exc.commit:
            headers["X-Repo-Commit"] = exc.commit
    return web.json_response({"error": exc.detail}, status=exc.status, headers=headers)


RENDERER = Renderer(_error, lambda request: ['Bearer realm="modelcache"'])
