"""The pull client: blobs from a modelcache server by digest, in parallel ranged parts, resumable, verified.

A pull of one blob to ``PATH`` keeps, while it runs::

    PATH.partial         the bytes so far, each part at its own offset (the file is preallocated to the full
                         size, so a full disk is found before the first byte is fetched)
    PATH.partial.parts   a small JSON sidecar: the digest, size and part size, and which parts are complete

A part is recorded complete only after all its bytes were written, so a pull killed at any moment (kill -9)
resumes with exactly the parts the sidecar lists and fetches the others. The partial is flock()ed while a
pull writes it, so two pulls never write one file. Every ranged GET carries ``If-Range`` with the digest (the
server's strong ETag): a server that would answer anything but that blob answers the whole body instead,
which the client refuses rather than splice.

The sha256 is computed while the parts arrive, over the prefix written so far (from the received buffers
themselves where they extend that prefix, read back only where a part got ahead of it), so the whole-file
check costs little after the last byte; each batch's disk write is started as soon as it is written, so the
fsync finds little left to do. Only a match is fsynced and renamed to ``PATH``; a mismatch deletes
the partial and its sidecar and fails naming both digests. After a power loss (not a process kill) a part
recorded complete may not have reached the disk: the final check then fails, deletes the partial, and the
next pull starts over — slower, never wrong.

Names (``[vendor/]model:version``) resolve through ``/v1/artifacts`` to the promoted artifact; an artifact
with several files (a Hugging Face snapshot, an Ollama model) is pulled file by file into a folder.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
from yarl import URL

from ..digest import Digest
from ..errors import (
    ChecksumError,
    Conflict,
    Forbidden,
    InvalidInput,
    ModelcacheError,
    NotFound,
    StorageFull,
    Unauthorized,
)
from ..names import parse_model_name, parse_vendor, parse_version

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:12085"
DERIVED_PREFIX = ".ollama/"  # the cache's own derived files of an artifact (db/oci.py SYNTHESISED_PREFIX)
_BATCH_BYTES = 4 << 20  # bytes received before they are handed to the writer thread
_IN_FLIGHT = 4  # batches handed over and not yet written, per pull
_READ_BUFSIZE = 4 << 20  # aiohttp's buffer per response (its default, 64 KiB, pauses the socket constantly)
_HASH_CHUNK = 4 << 20
# Bytes per pwritev. The kernel sizes page-cache folios by the write, and large ones came out slow on the
# benchmark VM (fresh memory, first touched through the host): a 2 GiB pull spent 6.7-7.5 s of system time
# with 4 MiB writes, 5.3-6.5 s with 1 MiB, 3.3-3.7 s with 256 KiB, 2.2-3.0 s with 64 KiB, 3.1-4.2 s with
# 16 KiB (system calls). 32768 calls per 2 GiB cost next to nothing where folio size does not matter.
_WRITE_SLICE = 64 << 10
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # iovecs per pwritev
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


# Starts the disk write of a range without waiting for it (Python has no os.sync_file_range).
_sync_file_range = _libc_sync_file_range()
_RETRIES = 5
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)

OnBytes = Callable[[int], object]


class CacheUnreachable(ModelcacheError):
    """The cache did not answer (refused, reset, timed out, 5xx) after the retries."""

    status = 503
    title = "Cache unreachable"


class NotTheCache(CacheUnreachable):
    """A success answer that is not the API's JSON: something in front of the cache answered (a proxy's
    maintenance page). Waited out like a cache that does not answer."""

    title = "Not the cache's answer"


class RefusedAnswer(ModelcacheError):
    """The cache answered something this client will not act on: a redirect off its origin, a name that
    does not parse."""

    status = 502
    title = "Answer refused"


@dataclass(frozen=True, slots=True)
class PullSettings:
    """How a pull fetches: ``parallel_parts`` ranged GETs at once, of ``part_bytes`` each; ``limit_rate``
    caps the bytes per second over all of them (None: no cap)."""

    parallel_parts: int = 4
    part_bytes: int = 16 << 20
    limit_rate: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.parallel_parts <= 64:
            raise InvalidInput(f"parallel_parts is {self.parallel_parts}: expected 1 to 64")
        if self.part_bytes < 64 << 10:
            raise InvalidInput(f"part_bytes is {self.part_bytes}: expected at least 65536")
        if self.limit_rate is not None and self.limit_rate <= 0:
            raise InvalidInput(f"limit_rate is {self.limit_rate}: expected a positive number of bytes per second")


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to pull: where it goes inside the artifact, its blob digest and size."""

    path: str
    digest: Digest
    size: int
    media_type: str = "application/octet-stream"


@dataclass(frozen=True)
class Target:
    """What a reference resolved to: an artifact (with its registry row) or a bare blob (``artifact`` None)."""

    artifact: dict[str, Any] | None
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_folder(self) -> bool:
        return len(self.files) > 1

    @property
    def label(self) -> str:
        a = self.artifact
        if a is None:
            return str(self.files[0].digest)
        name = f"{a['vendor']}/{a['model']}" if a.get("vendor") else a["model"]
        return f"{name}:{a['version']} ({a['artifact_type']}, {a['digest']})"


@dataclass
class PullResult:
    """What one blob pull did: ``fetched`` bytes came over the network, ``reused`` were already there."""

    path: Path
    digest: Digest
    size: int
    fetched: int = 0
    reused: int = 0
    seconds: float = 0.0


def safe_relative(path: str, where: str) -> Path:
    """An artifact file's path as a relative Path; one that could escape its folder is rejected, never repaired."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\0" in path
            or any(p in ("", ".", "..") for p in parts)):
        raise InvalidInput(f"{where}: refusing file path {path[:200]!r}: it is not a plain relative path")
    return Path(*parts)


# -- references -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NameRef:
    vendor: str | None
    model: str
    version: str

    @classmethod
    def parse(cls, text: str) -> "NameRef":
        """``[vendor/]model:version``."""
        rest, colon, version = text.rpartition(":")
        if not colon or not rest or not version:
            raise InvalidInput(f"invalid reference {text[:200]!r}: expected sha256:<hex> or [vendor/]model:version")
        vendor, slash, model = rest.rpartition("/")
        return cls(parse_vendor(vendor) if slash else None, parse_model_name(model), parse_version(version))

    def __str__(self) -> str:
        return f"{self.vendor}/{self.model}:{self.version}" if self.vendor else f"{self.model}:{self.version}"


# -- the client ---------------------------------------------------------------------


class CacheClient:
    """The node's HTTP client of one modelcache server (``async with``); pulls only from that server: a
    redirect to another origin is refused before any request goes there (the server never redirects its
    /v1 API; a redirect elsewhere is a proxy or a lie, and bytes from there are not what the node was
    configured for)."""

    def __init__(self, url: str | None, token: str | None, settings: PullSettings | None = None) -> None:
        self.url = (url or os.environ.get("MODELCACHE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("MODELCACHE_TOKEN")
        self.settings = settings or PullSettings()
        self._session: aiohttp.ClientSession | None = None
        self._pace = _Pace(self.settings.limit_rate)

    async def __aenter__(self) -> "CacheClient":
        connector = aiohttp.TCPConnector(limit=self.settings.parallel_parts + 4)
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                              auto_decompress=False, middlewares=(self._own_origin_only,))
        return self

    async def _own_origin_only(self, request: aiohttp.ClientRequest,
                               handler: Callable[[aiohttp.ClientRequest], Any]) -> aiohttp.ClientResponse:
        # aiohttp runs a session's middlewares for every hop of a redirect, so this sees each URL before
        # anything is sent there
        if _origin(request.url) != _origin(URL(self.url)):
            raise RefusedAnswer(f"{request.method} redirected to {request.url.with_query(None)}: refused, this "
                                f"client takes answers only from the cache at {self.url}")
        return await handler(request)

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use CacheClient in `async with`"
        return self._session

    # -- JSON API -------------------------------------------------------------------

    async def call(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                   timeout: float | None = 30) -> Any:
        """One JSON call of the /v1 API; errors become our own, with the server's detail."""
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        try:
            async with self.session.request(method, self.url + path, params=params, json=body,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status >= 400:
                    raise await _error(resp, f"{method} {path}")
                raw = await resp.read()
                if not raw:
                    return None
                try:
                    return json.loads(raw)
                except ValueError:
                    raise NotTheCache(
                        f"{method} {resp.url.with_query(None)} answered {resp.status} "
                        f"{resp.headers.get('Content-Type') or 'without a content type'}, not the cache's "
                        f"JSON: {_first_bytes(raw)}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise CacheUnreachable(f"cannot reach modelcache at {self.url} ({method} {path}): "
                                   f"{_describe(exc)}") from None

    async def resolve(self, ref: str, artifact_type: str | None = None) -> Target:
        """A ``sha256:<hex>`` (an artifact's digest, or any blob's) or ``[vendor/]model:version``."""
        if ref.startswith("sha256:"):
            digest = Digest.parse(ref)
            try:
                return target_of(await self.call("GET", f"/v1/artifacts/{digest}"))
            except (NotFound, Forbidden):
                # not an artifact's digest (a layer, a config), or a token that may not read the registry
                size = await self.blob_size(digest)
                return Target(None, (RemoteFile(f"sha256-{digest.hex}", digest, size),))
        name = NameRef.parse(ref)
        body = await self.call("GET", "/v1/artifacts", query={
            "model": name.model, "vendor": name.vendor, "version": name.version, "state": "promoted",
            "type": artifact_type, "limit": 50})
        found = [a for a in body["artifacts"] if (a["vendor"] or None) == name.vendor]
        if not found:
            raise NotFound(f"no promoted {artifact_type + ' ' if artifact_type else ''}artifact of {name} "
                           f"at {self.url}")
        types = sorted({a["artifact_type"] for a in found})
        if len(types) > 1:
            raise InvalidInput(f"{name} has promoted artifacts of types {', '.join(types)}: choose one with --type")
        return target_of(found[0])

    async def blob_size(self, digest: Digest) -> int:
        path = f"/v1/blobs/{digest}"
        try:
            async with self.session.head(self.url + path, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status >= 400:
                    raise await _error(resp, f"HEAD {path}", digest)
                return int(resp.headers["Content-Length"])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise CacheUnreachable(f"cannot reach modelcache at {self.url} (HEAD {path}): {_describe(exc)}") from None

    async def fetch_small(self, digest: Digest, limit: int = 4 << 20) -> bytes:
        """A small blob (a manifest) read into memory, its digest checked."""
        path = f"/v1/blobs/{digest}"
        try:
            async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status >= 400:
                    raise await _error(resp, f"GET {path}", digest)
                # to the end of the body, however many reads it arrives in (read(n) returns what is
                # buffered, which is less than the body when the server wrote it in pieces)
                chunks: list[bytes] = []
                received = 0
                async for chunk in resp.content.iter_any():
                    received += len(chunk)
                    if received > limit:
                        raise ModelcacheError(f"blob {digest} from {self.url} is larger than {limit} bytes, "
                                              "too large for a manifest")
                    chunks.append(chunk)
                raw = b"".join(chunks)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise CacheUnreachable(f"cannot reach modelcache at {self.url} (GET {path}): {_describe(exc)}") from None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != digest.hex:
            raise ChecksumError(f"blob {digest} from {self.url}", str(digest), f"sha256:{actual}")
        return raw

    # -- blobs ----------------------------------------------------------------------

    async def pull_target(self, target: Target, out: Path, progress: OnBytes | None = None) -> list[PullResult]:
        """Every file of ``target``: one file to ``out``, or several into the folder ``out``."""
        if not target.is_folder:
            f = target.files[0]
            return [await self.pull_blob(f.digest, out, size=f.size, progress=progress)]
        results = []
        for f in target.files:
            dest = out / safe_relative(f.path, target.label)
            results.append(await self.pull_blob(f.digest, dest, size=f.size, progress=progress))
        return results

    async def pull_blob(self, digest: Digest, dest: Path, *, size: int | None = None,
                        progress: OnBytes | None = None) -> PullResult:
        """The blob ``digest`` to ``dest``, resuming ``dest.partial`` if an earlier pull left one."""
        started = time.monotonic()
        if size is None:
            size = await self.blob_size(digest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise StorageFull(f"no room left to create the folder {dest.parent} for blob {digest} "
                                  f"({os.strerror(exc.errno)})") from None
            raise
        if await asyncio.to_thread(_already_there, dest, digest, size):
            logger.info("blob %s already at %s, %d bytes", digest, dest, size)
            if progress:
                progress(size)
            return PullResult(dest, digest, size, reused=size, seconds=time.monotonic() - started)
        partial = Partial.open(dest, digest, size, self.settings.part_bytes)
        try:
            result = await _Transfer(self, partial, progress).run()
        except BaseException:
            if not partial.recorded:  # nothing a resume would reuse: leave no partial behind
                partial.discard()
            raise
        finally:
            partial.close()
        result.seconds = time.monotonic() - started
        logger.info("pulled blob %s to %s: %d bytes, %d fetched, %d resumed, %.1fs, %.1f MB/s", digest, dest,
                    size, result.fetched, result.reused, result.seconds,
                    result.fetched / 1e6 / result.seconds if result.seconds else 0.0)
        return result


def target_of(artifact: dict[str, Any]) -> Target:
    """The files an artifact's pull fetches: its own files, not the cache's derived ``.ollama/`` ones."""
    files = tuple(RemoteFile(f["path"], Digest.parse(f["digest"]), int(f["size_bytes"]),
                             f.get("media_type") or "application/octet-stream")
                  for f in artifact["files"] if not f["path"].startswith(DERIVED_PREFIX))
    if not files:
        raise NotFound(f"artifact {artifact['digest']} lists no files")
    return Target(artifact, files)


def default_output(target: Target, url: str) -> Path:
    """Where ``modelcache pull`` writes without ``-o``: the file's name, or ``MODEL-VERSION`` for a folder.

    Built from what the cache sent, so parsed with the names' own rules first: a name that does not parse
    (``../../x``) is refused, never turned into a path."""
    a = target.artifact
    try:
        if target.is_folder:
            assert a is not None  # a bare blob is one file
            parse_vendor(a.get("vendor"))
            return Path(f"{parse_model_name(a['model'])}-{parse_version(a['version'])}")
        return Path(safe_relative(target.files[0].path, "file path").name)
    except InvalidInput as exc:
        what = f"artifact {a['digest']}" if a is not None else f"blob {target.files[0].digest}"
        raise RefusedAnswer(f"{what} from the cache at {url}: {exc.detail}") from None


def _already_there(dest: Path, digest: Digest, size: int) -> bool:
    try:
        if not dest.is_file() or dest.stat().st_size != size:
            return False
        return sha256_file(dest) == digest.hex
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- the partial file and its sidecar -------------------------------------------------


@dataclass
class Partial:
    """``dest.partial`` (flock()ed, preallocated) and ``dest.partial.parts`` (the completed parts)."""

    dest: Path
    digest: Digest
    size: int
    part_bytes: int
    fd: int
    done: set[int] = field(default_factory=set)
    recorded: set[int] = field(default_factory=set)  # the parts the sidecar on disk lists: what a resume reuses

    @property
    def path(self) -> Path:
        return self.dest.with_name(self.dest.name + ".partial")

    @property
    def sidecar(self) -> Path:
        return self.dest.with_name(self.dest.name + ".partial.parts")

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.part_bytes))

    def span(self, index: int) -> tuple[int, int]:
        """The first and last byte (inclusive) of part ``index``."""
        first = index * self.part_bytes
        return first, min(self.size, first + self.part_bytes) - 1

    @classmethod
    def open(cls, dest: Path, digest: Digest, size: int, part_bytes: int) -> "Partial":
        path = dest.with_name(dest.name + ".partial")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise StorageFull(f"no room left on the filesystem of {dest.parent} to create {path.name} for "
                                  f"blob {digest} ({size} bytes, {os.strerror(exc.errno)}): free space there "
                                  "and pull again") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"another pull is writing {path}: wait for it to finish") from None
        partial = cls(dest, digest, size, part_bytes, fd)
        try:
            partial._resume_or_start()
        except BaseException:
            partial.close()
            raise
        return partial

    def _resume_or_start(self) -> None:
        try:
            recorded = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            recorded = None
        if (isinstance(recorded, dict) and recorded.get("digest") == str(self.digest)
                and recorded.get("size") == self.size and os.fstat(self.fd).st_size == self.size):
            # a sidecar written with another part size still says which byte ranges are whole
            old_bytes = recorded.get("part_bytes")
            old_done = recorded.get("done")
            if isinstance(old_bytes, int) and old_bytes > 0 and isinstance(old_done, list):
                whole = {i for i in old_done if isinstance(i, int)}
                for i in range(self.count):
                    first, last = self.span(i)
                    if all(j in whole for j in range(first // old_bytes, last // old_bytes + 1)):
                        self.done.add(i)
                if self.done:
                    logger.info("resuming blob %s at %s: %d of %d parts already complete", self.digest,
                                self.path, len(self.done), self.count)
        self.recorded = set(self.done)
        if not self.done:
            os.ftruncate(self.fd, 0)
        try:
            self._preallocate()
            self.record()
        except StorageFull:
            if not self.recorded:
                self.discard()
            raise

    def _preallocate(self) -> None:
        try:
            os.posix_fallocate(self.fd, 0, self.size) if self.size else None
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise self.no_room(exc, self.path, self.size) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(self.fd, self.size)  # a filesystem without fallocate: a sparse file

    def no_room(self, exc: OSError, file: Path, needed: int) -> StorageFull:
        """The one-line error for a full disk; what it says is kept is what ``pull_blob`` keeps (the partial
        and its sidecar when the sidecar lists completed parts, else nothing)."""
        kept = (f"completed parts are kept in {self.path.name}: freed space lets `modelcache pull` resume"
                if self.recorded else "nothing partial is kept: free space there and pull again")
        return StorageFull(f"no room left on the filesystem of {self.dest.parent} to write {file.name} "
                           f"({needed} bytes; blob {self.digest} is {self.size} bytes): "
                           f"{os.strerror(exc.errno or errno.ENOSPC)}; {kept}")

    def record(self, done: list[int] | None = None) -> None:
        """Write the sidecar (temp file, then rename: a kill leaves the old one or the new one); one writer
        at a time (``_Transfer`` holds a lock around it). A full disk leaves the old sidecar and no temp file."""
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        parts = sorted(self.done) if done is None else list(done)
        text = json.dumps({"digest": str(self.digest), "size": self.size, "part_bytes": self.part_bytes,
                           "done": parts})
        try:
            tmp.write_text(text)
            os.replace(tmp, self.sidecar)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _NO_ROOM:
                raise self.no_room(exc, self.sidecar, len(text)) from None
            raise
        self.recorded = set(parts)

    def write(self, chunks: list[bytes], offset: int) -> None:
        """``chunks`` one after the other from ``offset``: gathered (never copied into one buffer), at most
        ``_WRITE_SLICE`` bytes per system call."""
        try:
            group: list[memoryview] = []
            grouped = 0
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    group.append(view[:_WRITE_SLICE - grouped])
                    grouped += len(group[-1])
                    view = view[len(group[-1]):]
                    if grouped == _WRITE_SLICE or len(group) == _IOV_MAX:
                        offset = self._pwritev(group, offset)
                        group, grouped = [], 0
            if group:
                self._pwritev(group, offset)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise self.no_room(exc, self.path, sum(map(len, chunks))) from None
            raise

    def _pwritev(self, views: list[memoryview], offset: int) -> int:
        while views:
            n = os.pwritev(self.fd, views, offset)
            if n == 0:
                raise OSError(errno.EIO, f"pwritev wrote nothing to {self.path} at byte {offset}")
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        return offset

    def commit(self) -> None:
        """fsync, then rename into place, then fsync the folder: the file at ``dest`` is whole or absent."""
        os.fsync(self.fd)
        os.replace(self.path, self.dest)
        dir_fd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.sidecar.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Pace:
    """A cap on bytes per second shared by all parts (``--limit-rate``)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


class _Sink:
    """Writes one pull's bytes to the partial in one thread and hashes them in file order in another.

    Each is a single thread fed through a FIFO (not ``asyncio.to_thread``'s shared pool): a part's batches are
    written in the order they arrived, the hash is taken in file order without a lock, and writing (the
    page-cache copy) overlaps hashing on another core. A batch that starts where the hash stands is hashed
    from the very buffers just written, never read back; only bytes that were on disk ahead of the hash (parts
    completed before a resume, a later part while parts run in parallel) are read back once the hash reaches
    them. At most ``_IN_FLIGHT`` batches are held between receipt and hash, so a slow disk or hash slows the
    reads instead of filling memory.
    """

    def __init__(self, partial: Partial) -> None:
        self.partial = partial
        self.sha256 = hashlib.sha256()
        self.hashed_to = 0
        # part index -> bytes of it on disk contiguously from its start: the hash thread's, like hashed_to
        self.written = {i: partial.span(i)[1] - partial.span(i)[0] + 1 for i in partial.done}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-hash")
        self._room = asyncio.Semaphore(_IN_FLIGHT)
        self._last: dict[int, asyncio.Future[None]] = {}
        self._failed: BaseException | None = None
        self._stopping = False

    def start(self) -> None:
        """Hash what a resumed partial already holds from its start (read back while the first bytes are
        fetched)."""
        self._hasher.submit(self._advance, None, 0, ())

    async def write(self, index: int, offset: int, chunks: list[bytes]) -> None:
        """Queue ``chunks`` of part ``index`` for writing at ``offset``; waits only while the queue is full."""
        await self._room.acquire()
        loop = asyncio.get_running_loop()
        future = asyncio.wrap_future(self._writer.submit(self._write, index, offset, chunks,
                                                         lambda: loop.call_soon_threadsafe(self._room.release)))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # raised by drain(), not logged
        self._last[index] = future

    async def drain(self, index: int) -> None:
        """Wait until every batch of part ``index`` is written; a failed write raises here."""
        if index in self._last:
            await self._last[index]

    async def finish(self) -> str:
        """The sha256 of the whole file, once every part is drained."""
        await asyncio.wrap_future(self._hasher.submit(self._advance, None, 0, ()))
        if self._failed is not None:
            raise self._failed
        if self.hashed_to != self.partial.size:
            raise ModelcacheError(f"{self.partial.path}: only {self.hashed_to} of {self.partial.size} bytes of "
                                  f"blob {self.partial.digest} were written")
        return self.sha256.hexdigest()

    def stop(self) -> None:
        """Drop what is queued and wait for both threads (at most one batch or read-back slice each): the
        partial's file descriptor is closed right after, and no write or read may outlive it."""
        self._stopping = True
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)

    # -- in the threads --

    def _write(self, index: int, offset: int, chunks: list[bytes], release: Callable[[], object]) -> None:
        try:
            if self._failed is not None:  # nothing more is written once a write or the hash failed
                raise self._failed
            self.partial.write(chunks, offset)
            if _sync_file_range is not None:
                # start this batch's way to the disk now, so that the fsync before the rename finds little
                # left to write; a failure here only leaves that work to the fsync
                _sync_file_range(self.partial.fd, offset, sum(map(len, chunks)), _SYNC_FILE_RANGE_WRITE)
        except BaseException as exc:
            self._failed = self._failed or exc
            release()
            raise
        self._hasher.submit(self._hash, index, offset, chunks, release)

    def _hash(self, index: int, offset: int, chunks: list[bytes], release: Callable[[], object]) -> None:
        try:
            self.written[index] = offset + sum(map(len, chunks)) - self.partial.span(index)[0]
            self._advance(index, offset, chunks)
        except BaseException as exc:
            self._failed = self._failed or exc
        finally:
            release()

    def _advance(self, index: int | None, offset: int, chunks: tuple[bytes, ...] | list[bytes]) -> None:
        """Hash forward as far as the parts are on disk contiguously from byte 0."""
        p = self.partial
        while self.hashed_to < p.size and not self._stopping and self._failed is None:
            i = self.hashed_to // p.part_bytes
            end = p.span(i)[0] + self.written.get(i, 0)
            if end <= self.hashed_to:
                return
            if i == index and offset == self.hashed_to:  # the batch just written: hash it from memory
                for chunk in chunks:
                    self.sha256.update(chunk)
                self.hashed_to = offset + sum(map(len, chunks))
                index = None
                continue
            chunk = os.pread(p.fd, min(_HASH_CHUNK, end - self.hashed_to), self.hashed_to)
            if not chunk:
                raise ModelcacheError(f"{p.path} is shorter than expected at byte {self.hashed_to}")
            self.sha256.update(chunk)
            self.hashed_to += len(chunk)


class _Transfer:
    """One blob's missing parts fetched by ``parallel_parts`` workers; a ``_Sink`` writes and hashes them."""

    def __init__(self, client: CacheClient, partial: Partial, progress: OnBytes | None) -> None:
        self.client = client
        self.partial = partial
        self.progress = progress or (lambda n: None)
        self.url = f"{client.url}/v1/blobs/{partial.digest}"
        self.fetched = 0
        self.recording = asyncio.Lock()
        self.sink = _Sink(partial)
        self.handed: dict[int, int] = {}  # part index -> bytes handed to the sink (a retry resumes there)

    async def run(self) -> PullResult:
        p = self.partial
        reused = sum(p.span(i)[1] - p.span(i)[0] + 1 for i in p.done) if p.size else 0
        if reused:
            self.progress(reused)
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(p.count):
            if i not in p.done and p.size:
                todo.put_nowait(i)
        self.sink.start()
        workers = [asyncio.create_task(self._worker(todo)) for _ in range(min(self.client.settings.parallel_parts,
                                                                               max(1, todo.qsize())))]
        try:
            await asyncio.gather(*workers)
            actual = await self.sink.finish()
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            self.sink.stop()
        if actual != p.digest.hex:
            p.discard()
            raise ChecksumError(f"blob pulled from {self.url} to {p.dest} (partial deleted)", str(p.digest),
                                f"sha256:{actual}")
        await asyncio.to_thread(p.commit)
        return PullResult(p.dest, p.digest, p.size, fetched=self.fetched, reused=reused)

    async def _worker(self, todo: asyncio.Queue[int]) -> None:
        while not todo.empty():
            index = todo.get_nowait()
            await self._part_with_retries(index)
            await self.sink.drain(index)  # recorded complete only once all its bytes are written
            self.partial.done.add(index)
            async with self.recording:
                await asyncio.to_thread(self.partial.record, sorted(self.partial.done))

    async def _part_with_retries(self, index: int) -> None:
        delay = 0.5
        for attempt in range(1, _RETRIES + 1):
            try:
                return await self._part(index)
            except CacheUnreachable as exc:
                if attempt == _RETRIES:
                    raise
                logger.warning("part %d of blob %s failed (%s); retrying in %.1fs", index, self.partial.digest,
                               exc.detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)

    async def _part(self, index: int) -> None:
        """Part ``index`` from where an earlier attempt stopped to its end, handed to the sink in batches."""
        p = self.partial
        first, last = p.span(index)
        offset = first + self.handed.get(index, 0)
        if offset > last:
            return
        headers = {"Range": f"bytes={offset}-{last}", "If-Range": f'"{p.digest}"', "Accept-Encoding": "identity"}
        batch: list[bytes] = []
        batched = 0
        try:
            async with self.client.session.get(self.url, headers=headers, read_bufsize=_READ_BUFSIZE) as resp:
                if resp.status >= 500:
                    raise CacheUnreachable(f"GET {self.url} answered {resp.status}")
                if resp.status != 206:
                    if resp.status >= 400:
                        raise await _error(resp, f"GET /v1/blobs/{p.digest}", p.digest)
                    raise ModelcacheError(f"GET {self.url} with Range bytes={offset}-{last} answered "
                                          f"{resp.status}, not 206: the server does not serve this blob by ranges")
                # iter_chunks() hands over aiohttp's buffers as they came, where iter_chunked(n) joins copies
                async for chunk, _ in resp.content.iter_chunks():
                    if offset + batched + len(chunk) > last + 1:
                        raise ModelcacheError(f"GET {self.url} with Range bytes={first}-{last} sent more bytes "
                                              "than asked for")
                    batch.append(chunk)
                    batched += len(chunk)
                    self.fetched += len(chunk)
                    self.progress(len(chunk))
                    await self.client._pace.take(len(chunk))
                    if batched >= _BATCH_BYTES:
                        await self._hand_over(index, offset, batch)
                        offset, batch, batched = offset + batched, [], 0
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            self.progress(-batched)  # received but not handed over: the retry fetches it again
            raise CacheUnreachable(f"GET {self.url} bytes={offset}-{last}: {_describe(exc)}") from None
        if batch:
            await self._hand_over(index, offset, batch)
            offset += batched
        if offset != last + 1:
            raise CacheUnreachable(f"GET {self.url} bytes={first}-{last} ended after {offset - first} bytes")

    async def _hand_over(self, index: int, offset: int, batch: list[bytes]) -> None:
        await self.sink.write(index, offset, batch)
        self.handed[index] = offset + sum(map(len, batch)) - self.partial.span(index)[0]


# -- errors ----------------------------------------------------------------------------


async def _error(resp: aiohttp.ClientResponse, what: str, digest: Digest | None = None) -> ModelcacheError:
    try:
        detail = (await resp.json(content_type=None)).get("detail")
    except (ValueError, AttributeError, aiohttp.ClientError):
        detail = None
    detail = detail or resp.reason or ""
    where = f"{what} at {resp.url.origin()}"
    if resp.status == 401:
        return Unauthorized(f"{where}: 401 {detail} (pass --token or set MODELCACHE_TOKEN)")
    if resp.status == 403:
        return Forbidden(f"{where}: 403 {detail}")
    if resp.status == 404:
        return NotFound(f"{where}: 404 {detail or f'no blob {digest}'}")
    if resp.status >= 500:
        return CacheUnreachable(f"{where}: {resp.status} {detail}")
    if resp.status in (400, 422):
        return InvalidInput(f"{where}: {resp.status} {detail}")
    if resp.status == 409:
        return Conflict(f"{where}: 409 {detail}")
    return ModelcacheError(f"{where}: {resp.status} {detail}")


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme.lower(), (url.host or "").lower(), url.port


def _first_bytes(raw: bytes, n: int = 120) -> str:
    """The start of a body for a one-line message: decoded leniently, whitespace folded, quoted."""
    text = " ".join(raw[:n].decode("utf-8", errors="replace").split())
    return repr(text + ("…" if len(raw) > n else ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
