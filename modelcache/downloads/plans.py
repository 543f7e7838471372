"""What a reference of a multi-file source kind resolves to: the files to fetch and the artifact they make.

:func:`resolve` asks the upstream for its metadata when the transfer starts
and answers a :class:`Plan`; the worker then fetches each file (verified
against the size and digest declared here) and puts them together as
``plan.layout`` says:

    file     one file (a GGUF from another cache): the file import road
    folder   a snapshot (safetensors with its config): the folder import road, same file paths
    ollama   a Docker v2 manifest and its blobs: the Ollama-directory import road, manifest byte for byte

Per kind:

- ``modelcache``: ``GET /v1/artifacts/<digest>`` (or ``/v1/artifacts?model=&version=``) for the files,
  their digests and sizes and the artifact's type; bytes from ``/v1/blobs/<digest>``. The artifact's
  digest is declared too, and the one we make must equal it (same files, same paths).
- ``huggingface``: the Hub's API as ``HfApi.model_info(files_metadata=True)`` reads it,
  ``{endpoint}/api/models/{repo}/revision/{rev}?blobs=true``, for the commit and the files (an LFS file's
  sha256; a small file's size and git blob id only), or, when it lists no files (a large repository), the
  tree ``{endpoint}/api/models/{repo}/tree/{commit}?recursive=true`` page by page; read through the guarded
  session like every other request (``huggingface_hub``'s own client would ignore ``downloads.ca_bundle``
  and the hop policy), and never redirected off the source's origin. Bytes from
  ``{endpoint}/{repo}/resolve/{commit}/{path}``, the commit pinned so every file is of one revision.
- ``ollama``: the manifest from ``/v2/<ns>/<model>/manifests/<tag>`` (Accept: Docker v2 only, as Ollama
  asks), after a registry's Bearer challenge (401 → the realm's token → again: ``registry_auth.py``, which
  also says where credentials go); the config and layers by digest from ``/v2/<ns>/<model>/blobs/<digest>``
  with that token, asked for again when the registry answers 401 later in the download.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from ..config import DownloadSettings
from ..db.oci import SYNTHESISED_PREFIX
from ..digest import Digest
from ..errors import ChecksumError, InvalidInput, NotFound
from ..formats import DOCKER_MANIFEST_V2, load_json_object
from ..formats.folder import is_hidden
from ..formats.ollama import MAX_MANIFEST_BYTES, Manifest
from .policy import HopPolicy
from .registry_auth import RegistryAuth
from .sources import ArtifactRef, HubRef, OllamaRef, Source
from .transfer import Transfer, UpstreamError

logger = logging.getLogger(__name__)

MAX_METADATA_BYTES = 8 << 20
MAX_TREE_PAGES = 1000  # of the Hub's tree listing, 1000 entries each
SERVABLE = ("promoted", "staged")  # what another cache may hand out (staged: to its admins and operators)
# what :func:`resolve` was given to show its metadata GET in flight on (``.current``), so the worker's
# progress loop can write why the upstream is being asked again to the job's row, as for the files
_WATCH: contextvars.ContextVar[Any] = contextvars.ContextVar("plan_watch", default=None)


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it goes in the artifact, where it comes from, what the upstream declares."""

    path: str
    url: str
    size: int | None
    digest: Digest | None  # the sha256 the upstream declares; None: only the size (and git_sha1) is known
    git_sha1: str | None = None  # the Hub's git blob id of a small (non-LFS) file

    def check(self, size: int, digest: Digest, git_sha1: str | None) -> None:
        """The fetched file is what was declared; ChecksumError names the file and both values."""
        if self.size is not None and size != self.size:
            raise ChecksumError(f"{self.path} from {_shown(self.url)}", f"{self.size} bytes", f"{size} bytes")
        if self.digest is not None and digest != self.digest:
            raise ChecksumError(f"{self.path} from {_shown(self.url)}", str(self.digest), str(digest))
        if self.git_sha1 is not None and git_sha1 is not None and git_sha1 != self.git_sha1:
            raise ChecksumError(f"{self.path} from {_shown(self.url)}", f"git blob {self.git_sha1}",
                                f"git blob {git_sha1}")


@dataclass(frozen=True)
class Plan:
    layout: str  # file, folder or ollama
    artifact_type: str
    files: tuple[RemoteFile, ...]
    source_uri: str
    token: str | None  # sent with the file GETs, to the source's own host only
    digest: Digest | None = None  # the artifact digest the upstream declares
    manifest: bytes | None = None  # ollama: the manifest as the registry served it
    auth: RegistryAuth | None = None  # ollama: the registry's token, asked again when it answers 401

    @property
    def total(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes) + len(self.manifest or b"")  # type: ignore[arg-type]


async def resolve(source: Source, reference: ArtifactRef | HubRef | OllamaRef, session: aiohttp.ClientSession,
                  policy: HopPolicy, artifact_type: str | None, settings: DownloadSettings | None = None, *,
                  watch: Any = None) -> Plan:
    """``settings``: the process's downloads settings; metadata GETs are asked again as often as files are.
    ``watch``: an object whose ``current`` is set to each metadata GET's Transfer while it runs (its
    ``retrying`` says why the upstream is being asked again)."""
    token = _WATCH.set(watch)
    try:
        if isinstance(reference, ArtifactRef):
            return await _modelcache(source, reference, session, policy, artifact_type, settings)
        if isinstance(reference, HubRef):
            return await _huggingface(source, reference, session, policy, artifact_type, settings)
        return await _ollama(source, reference, session, policy, artifact_type, settings)
    finally:
        _WATCH.reset(token)


# -- modelcache ----------------------------------------------------------------------------


async def _modelcache(source: Source, ref: ArtifactRef, session: aiohttp.ClientSession, policy: HopPolicy,
                      artifact_type: str | None, settings: DownloadSettings | None) -> Plan:
    token = source.token()
    if ref.digest is not None:
        found = [await _get_json(session, policy, source.url_of(f"v1/artifacts/{ref.digest}"), token, settings)]
    else:
        query = {"model": ref.model, "version": ref.version, "limit": "100"}
        if ref.vendor:
            query["vendor"] = ref.vendor
        if artifact_type:
            query["type"] = artifact_type
        page = await _get_json(session, policy, source.url_of("v1/artifacts") + "?" + urllib.parse.urlencode(query),
                               token, settings)
        found = [a for a in page.get("artifacts", []) if a.get("vendor") == ref.vendor]
    found = [a for a in found if a.get("state") in SERVABLE]
    if not found:
        raise NotFound(f"{source.id} ({source.base_url}) holds no servable artifact {ref}")
    if len(found) > 1:
        raise InvalidInput(f"{source.id} holds {len(found)} artifacts for {ref} ("
                           f"{', '.join(sorted(a['artifact_type'] + ' ' + a['digest'] for a in found))}); ask "
                           "for one by its digest or give the artifact type")
    artifact = found[0]
    try:
        kind = artifact["artifact_type"]
        digest = Digest.parse(artifact["digest"])
        files = tuple(RemoteFile(_file_path(f["path"]), source.url_of(f"v1/blobs/{Digest.parse(f['digest'])}"),
                                 int(f["size_bytes"]), Digest.parse(f["digest"])) for f in artifact["files"]
                      if not f["path"].startswith(SYNTHESISED_PREFIX))  # derived here again, at registration
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise UpstreamError(f"{source.id}: /v1/artifacts answered an artifact we cannot read ({exc})") from None
    if artifact_type and kind != artifact_type:
        raise InvalidInput(f"{source.id}: {ref} is a {kind} artifact, not {artifact_type}")
    if kind == "ollama":
        layout = "ollama"
    elif len(files) == 1 and files[0].digest == digest:
        layout = "file"
    else:
        layout = "folder"
    return Plan(layout, kind, files, f"{source.base_url}v1/artifacts/{digest}", token, digest)


def _file_path(path: Any) -> str:
    """A file path of an artifact as another cache lists it: relative, no '..', nothing hidden."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if not all(parts) or any(p in (".", "..") or is_hidden(p) or "\0" in p for p in parts):
        raise InvalidInput(f"file path {str(path)[:100]!r} is not a relative path of plain names")
    return path


# -- huggingface ---------------------------------------------------------------------------


async def _huggingface(source: Source, ref: HubRef, session: aiohttp.ClientSession, policy: HopPolicy,
                       artifact_type: str | None, settings: DownloadSettings | None) -> Plan:
    """The Hub's API read through the guarded session (the CA bundle, the proxy, every hop checked, and
    never a redirect off the source's origin), as ``HfApi.model_info(files_metadata=True)`` reads it."""
    token = source.token()
    endpoint = source.base_url.rstrip("/")
    api = f"{endpoint}/api/models/{ref.repo}"
    what = f"{source.id}: {ref.repo}@{ref.revision}"
    info = await _hub_json(session, policy, f"{api}/revision/{urllib.parse.quote(ref.revision, safe='')}"
                           "?blobs=true", token, settings, what)
    commit = info.get("sha")
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise UpstreamError(f"{what} has no commit id ({commit!r})")
    try:
        listed = info.get("siblings") or []
        found = [_HubFile(s["rfilename"], s.get("size"), s.get("blobId"), s.get("lfs")) for s in listed]
        if not found:  # a repository too large for the info lists its tree instead
            found = await _hub_tree(session, policy, f"{api}/tree/{commit}?recursive=true&expand=true", token,
                                    settings, what)
        files = []
        for f in found:
            if any(is_hidden(p) for p in f.path.split("/")) or not ref.wants(f.path):
                continue  # .gitattributes and the like are not part of a folder artifact
            _file_path(f.path)
            url = f"{endpoint}/{ref.repo}/resolve/{commit}/" + urllib.parse.quote(f.path)
            if f.lfs is not None:  # the model info names the sha256 "sha256", the tree "oid"
                sha = f.lfs.get("sha256") or f.lfs.get("oid")
                files.append(RemoteFile(f.path, url, int(f.lfs["size"]), Digest.parse(f"sha256:{sha}")))
            else:  # a small file in git: its size and git blob id are all the Hub says
                size = int(f.size) if f.size is not None else None
                files.append(RemoteFile(f.path, url, size, None, str(f.blob_id) if f.blob_id else None))
    except (KeyError, TypeError, ValueError, AttributeError, InvalidInput) as exc:
        raise UpstreamError(f"{what}: the Hub's API answered a file list we cannot read ({exc})") from None
    if not files:
        raise NotFound(f"{what} names no files ({len(found)} in the repository"
                       f"{', none matching the include patterns' if ref.include else ''})")
    return Plan("folder", artifact_type or "safetensors", tuple(files),
                f"{endpoint}/{ref.repo}/tree/{commit}", token)


@dataclass(frozen=True)
class _HubFile:
    path: str
    size: int | None
    blob_id: str | None
    lfs: dict | None


async def _hub_tree(session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                    settings: DownloadSettings | None, what: str) -> list[_HubFile]:
    """Every file of the tree listing, its pages followed by their ``Link: <...>; rel="next"``."""
    found: list[_HubFile] = []
    next_url: str | None = url
    for _ in range(MAX_TREE_PAGES):
        if next_url is None:
            return found
        raw, headers = await _get_answer(session, policy, next_url, token, {"Accept": "application/json"},
                                         MAX_METADATA_BYTES, settings, own_origin=True)
        try:
            page = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(f"{what}: the tree listing is not JSON: {exc}") from None
        if not isinstance(page, list):
            raise UpstreamError(f"{what}: the tree listing is not a list")
        found += [_HubFile(e["path"], e.get("size"), e.get("oid"), e.get("lfs")) for e in page
                  if isinstance(e, dict) and e.get("type") == "file"]
        next_url = _next_link(headers.get("Link", ""), next_url)
    raise UpstreamError(f"{what}: the tree listing has more than {MAX_TREE_PAGES} pages")


def _next_link(header: str, base: str) -> str | None:
    for part in header.split(","):
        match = re.fullmatch(r'\s*<([^>]*)>\s*;(.*)', part)
        if match and re.search(r'rel="?next"?', match.group(2)):
            return urllib.parse.urljoin(base, match.group(1))
    return None


async def _hub_json(session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                    settings: DownloadSettings | None, what: str) -> dict:
    """A JSON object from the Hub's API; its 401 or 404 (a repository or revision it does not know, or
    will not show to this token) is a NotFound."""
    try:
        raw, _ = await _get_answer(session, policy, url, token, {"Accept": "application/json"},
                                   MAX_METADATA_BYTES, settings, own_origin=True)
    except UpstreamError as exc:
        if exc.upstream_status in (401, 404):
            raise NotFound(f"{what}: {exc.detail}") from None
        raise
    try:
        return load_json_object(raw, MAX_METADATA_BYTES)
    except ValueError as exc:
        raise UpstreamError(f"{_shown(url)} answered something other than a JSON object: {exc}") from None


# -- ollama --------------------------------------------------------------------------------


async def _ollama(source: Source, ref: OllamaRef, session: aiohttp.ClientSession, policy: HopPolicy,
                  artifact_type: str | None, settings: DownloadSettings | None) -> Plan:
    if artifact_type not in (None, "ollama"):
        raise InvalidInput(f"an ollama source gives ollama artifacts, not {artifact_type}")
    url = source.url_of(f"v2/{ref.repository}/manifests/{ref.tag}")
    accept = {"Accept": DOCKER_MANIFEST_V2}  # as Ollama asks: a registry answers the Docker v2 form or 404
    auth = RegistryAuth(session, policy, source, ref.repository, settings)  # a 401 asks its realm for a token
    raw = await _get(session, policy, url, None, accept, MAX_MANIFEST_BYTES, settings, auth=auth)
    manifest = Manifest.parse(raw, f"{source.id}:{ref}")
    files = tuple(RemoteFile(f"blobs/sha256-{d.digest.hex}", source.url_of(f"v2/{ref.repository}/blobs/{d.digest}"),
                             d.size, d.digest) for d in manifest.blobs)
    digest = Digest(hashlib.sha256(raw).hexdigest())
    return Plan("ollama", "ollama", files, f"{source.base_url}v2/{ref.repository}/manifests/{ref.tag}", None,
                digest, raw, auth)


# -- small GETs through the guarded session -------------------------------------------------


async def _get(session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
               headers: dict[str, str] | None, limit: int, settings: DownloadSettings | None, *,
               auth: RegistryAuth | None = None) -> bytes:
    return (await _get_answer(session, policy, url, token, headers, limit, settings, auth=auth))[0]


async def _get_answer(session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                      headers: dict[str, str] | None, limit: int, settings: DownloadSettings | None, *,
                      own_origin: bool = False, auth: RegistryAuth | None = None) -> tuple[bytes, Mapping[str, str]]:
    """The body (at most ``limit`` bytes) and headers of a small GET; ``own_origin``: see HopPolicy.check."""
    transfer = Transfer(session, policy, url, token, headers, settings=settings, own_origin=own_origin, auth=auth)
    if (watch := _WATCH.get()) is not None:
        watch.current = transfer
    response = await transfer.open()
    try:
        if response.content_length is not None and response.content_length > limit:
            raise UpstreamError(f"{_shown(url)} answered {response.content_length} bytes, more than {limit}")
        raw = bytearray()
        async for chunk in response.content.iter_any():
            raw += chunk
            if len(raw) > limit:
                raise UpstreamError(f"{_shown(url)} answered more than {limit} bytes")
        return bytes(raw), response.headers
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(f"{_shown(url)}: {exc or type(exc).__name__}") from None
    finally:
        response.release()


async def _get_json(session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                    settings: DownloadSettings | None) -> dict:
    raw = await _get(session, policy, url, token, {"Accept": "application/json"}, MAX_METADATA_BYTES, settings)
    try:
        return load_json_object(raw, MAX_METADATA_BYTES)
    except ValueError as exc:
        raise UpstreamError(f"{_shown(url)} answered something other than a JSON object: {exc}") from None


def _shown(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

