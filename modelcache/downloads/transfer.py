"""One HTTP transfer from an upstream: redirects followed by hand (each hop checked), resumed when dropped.

A dropped connection (a reset, a body cut short, ``downloads.read_timeout``
without a byte) is resumed with ``Range: bytes=<offset>-`` and ``If-Range:
<validator>``, the validator being the upstream's strong ETag or else its
Last-Modified: if the file changed meanwhile the upstream answers 200 with the
whole new file instead of 206, and the transfer starts over from byte 0
(:class:`UpstreamChanged`) rather than splicing two versions together.

An upstream answering 429 or 5xx, or not reachable, is asked again
(``downloads.retries`` times per request, after its ``Retry-After`` or a
doubling backoff), each attempt logged; meanwhile :attr:`Transfer.retrying`
says why, for the job's row.

Every byte received counts against :data:`BUDGET`, the bytes per second all
upstream transfers of this process share (``downloads.max_bytes_per_second``).

:func:`fetch` is one file's whole transfer into ``tmp/downloads/<name>.partial``:

- below ``downloads.part_threshold_bytes``, or from an upstream that does not
  announce ``Accept-Ranges: bytes`` (or sends no validator), one stream, hashed
  as it is appended;
- above it, ``downloads.parallel_parts`` connections fetch fixed-size segments
  in ascending order, each a ranged request with ``If-Range``, written at its
  offset into the preallocated partial file. The sha256 is still one pass over
  the bytes in file order: a hashing thread follows the contiguous prefix as it
  grows, reading it back from the page cache (a few hundred MB/s of extra
  memory reads, far cheaper than the hash itself) while the segments after it
  are still arriving, so at the end only the last few segments are left to hash
  instead of the whole file. Completed segments are recorded in the sidecar
  ``tmp/downloads/<name>.json`` (after an fdatasync of the partial file, so a
  segment recorded is a segment on disk); after a restart only the missing
  segments are fetched and the recorded prefix is hashed again from disk.
"""

from __future__ import annotations

import asyncio
import email.utils
import fcntl
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Protocol

import aiohttp

from ..config import DownloadSettings
from ..errors import ModelcacheError, SourceChanged
from ..hashing import CHUNK, Hasher
from ..store import BlobStore, ResumableTemp
from .policy import GuardedResolver, HopPolicy, InternalAddress, PolicyRefused

logger = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_RESUMES = 20  # drops resumed within one attempt before the transfer counts as failed
MAX_RESTARTS = 3  # an upstream that changes under us this often in one fetch fails it
NOTES_SECONDS = 1.0  # the sidecar of a download in parts is rewritten at most this often
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class UpstreamError(ModelcacheError):
    """The upstream answered something we cannot use (404, 5xx, a bad range) or could not be reached."""

    status = 502
    title = "Upstream error"

    def __init__(self, detail: str, challenge: str | None = None, upstream_status: int | None = None) -> None:
        super().__init__(detail)
        self.challenge = challenge  # a 401's WWW-Authenticate, for a registry's token flow
        self.upstream_status = upstream_status  # the status the upstream answered, when it answered one


class UpstreamChanged(ModelcacheError):
    """The file changed upstream between two requests of one download: start over from byte 0."""

    status = 409
    title = "Upstream changed"


class _Retryable(UpstreamError):
    """An answer or failure worth asking again for: 429, 5xx, a connection that could not be made."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after  # seconds, from the answer's Retry-After


class Budget:
    """The bytes per second all upstream transfers of this process share: a token bucket.

    Kept as the time at which the bytes taken so far are paid for (GCRA): each
    chunk received moves it on by ``len / rate`` and its receiver sleeps while
    it is more than ``BURST_SECONDS`` ahead of now, so concurrent transfers
    split the rate between them by how fast they ask. Not bound to an event
    loop: it is plain arithmetic and ``asyncio.sleep``.
    """

    BURST_SECONDS = 0.25

    def __init__(self) -> None:
        self.rate = 0
        self._paid_until = 0.0

    def configure(self, rate: int) -> None:
        if rate != self.rate:
            self.rate, self._paid_until = rate, 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._paid_until = max(self._paid_until, now) + n / self.rate
        wait = self._paid_until - now - self.BURST_SECONDS
        if wait > 0:
            await asyncio.sleep(wait)


BUDGET = Budget()  # downloads.max_bytes_per_second, for every transfer of this process


def open_session(policy: HopPolicy, settings: DownloadSettings) -> aiohttp.ClientSession:
    """A client session for one transfer: the policy's resolver, the CA bundle, the proxy environment.

    Also sets the process's :data:`BUDGET` to ``downloads.max_bytes_per_second``.
    """
    BUDGET.configure(settings.max_bytes_per_second)
    ssl_context: ssl.SSLContext | bool = True
    if settings.ca_bundle is not None:
        ssl_context = ssl.create_default_context(cafile=str(settings.ca_bundle))
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False, ssl=ssl_context)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout)
    # trust_env: HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured, as curl does
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True, auto_decompress=False)


class Transfer:
    """The bytes of ``url``, from ``offset`` on, through ``session``."""

    def __init__(self, session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                 headers: dict[str, str] | None = None, *, settings: DownloadSettings | None = None,
                 budget: Budget | None = None, own_origin: bool = False, auth: "RegistryAuthLike | None" = None,
                 credentials: str | None = None) -> None:
        self.session = session
        self.headers = headers or {}  # sent on every hop (an Accept, for a registry's manifest)
        self.policy = policy
        self.own_origin = own_origin  # redirects only within the configured source's origin (metadata)
        self.url = url
        self.token = token
        # a registry's token auth (registry_auth.py): its current token is sent, and a 401 asks for another
        self.auth = auth
        self.credentials = credentials  # a whole Authorization value instead of the Bearer token (a realm's Basic)
        self.settings = settings or DownloadSettings()
        self.budget = budget or BUDGET
        self.offset = 0  # where the next byte received goes in the file (fetched in parts: bytes done)
        self.total: int | None = None
        self.validator: str | None = None
        self.ranges = False  # the upstream announced Accept-Ranges: bytes
        self.ranges_ignored = False  # ...and then answered a part's Range with the whole file, unchanged
        self.end: int | None = None  # the byte after the last one the answer being read should give
        self.part_end: int | None = None  # the same, asked for in the Range of a part
        self.resumes = 0
        self.retries = 0  # requests asked again (429, 5xx, no connection) over the transfer
        self.retrying: str | None = None  # why the upstream is being asked again, while it is

    def part(self) -> "Transfer":
        """A transfer of a byte range of the same file and version, through the same session."""
        part = Transfer(self.session, self.policy, self.url, self.token, self.headers, settings=self.settings,
                        budget=self.budget, auth=self.auth, credentials=self.credentials)
        part.validator, part.total = self.validator, self.total
        return part

    async def open(self, offset: int = 0, validator: str | None = None, *,
                   end: int | None = None) -> aiohttp.ClientResponse:
        """Request the file (from ``offset``, if the upstream still has the version ``validator`` names).

        Afterwards ``offset`` is where the answer's body starts: ``0`` when the upstream sent the
        whole file (it changed, or ignores ranges). ``total`` and ``validator`` are the upstream's.
        ``end``: only the bytes before it (a part). A 429, a 5xx or a connection that cannot be
        made is asked again, ``downloads.retries`` times, each attempt logged.
        """
        attempt = 0
        renewed = False
        while True:
            sent = self.auth.token if self.auth is not None else self.token
            try:
                response = await self._request(offset, validator, end, sent)
            except _Retryable as exc:
                attempt += 1
                self.retries += 1
                if attempt > self.settings.retries:
                    self.retrying = None
                    raise UpstreamError(f"{exc.detail} ({attempt} attempts, downloads.retries = "
                                        f"{self.settings.retries})") from None
                backoff = min(self.settings.retry_seconds * 2 ** (attempt - 1), self.settings.retry_max_seconds)
                delay = backoff if exc.retry_after is None else min(exc.retry_after,
                                                                    self.settings.retry_max_seconds)
                self.retrying = (f"{exc.detail}; asking again in {delay:.1f}s "
                                 f"(attempt {attempt + 1} of {self.settings.retries + 1})")
                logger.warning("download from %s: %s; asking again in %.1fs (attempt %d of %d)",
                               _shown(self.url), exc.detail, delay, attempt + 1, self.settings.retries + 1)
                await asyncio.sleep(delay)
                continue
            except UpstreamError as exc:
                # a registry's challenge (registry_auth.py): a token from its realm, then once more
                if exc.upstream_status != 401 or self.auth is None or renewed:
                    if renewed and exc.upstream_status == 401:
                        raise UpstreamError(f"{exc.detail}, even with a token its realm gave", exc.challenge,
                                            401) from None
                    raise
                renewed = True
                await self.auth.renew(exc.challenge, sent)
                continue
            self.retrying = None
            return response

    async def _request(self, offset: int, validator: str | None, end: int | None,
                       token: str | None) -> aiohttp.ClientResponse:
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if (offset or end is not None) and validator:
            headers["Range"] = f"bytes={offset}-{end - 1 if end is not None else ''}"
            headers["If-Range"] = validator
        self.part_end = end
        url = self.url
        for hop in range(self.policy.max_redirects + 2):
            self.policy.check(url, hop, own_origin=self.own_origin)
            sent = dict(headers)
            if self.policy.trusts(url):  # credentials go to the configured source (or an allowed prefix) only
                if self.credentials:
                    sent["Authorization"] = self.credentials
                elif token:
                    sent["Authorization"] = f"Bearer {token}"
            try:
                response = await self.session.get(url, headers=sent, allow_redirects=False)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, InternalAddress):
                    raise PolicyRefused("internal_address", str(exc.os_error).split(": ", 1)[1]) from None
                if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
                    # a certificate will not be right the next time either: no retry
                    raise UpstreamError(f"cannot reach {_shown(url)}: {exc.os_error}") from None
                raise _Retryable(f"cannot reach {_shown(url)}: {exc.os_error}") from None
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:  # dropped before the headers
                raise _Retryable(f"{_shown(url)} did not answer: {exc or type(exc).__name__}") from None
            if response.status in REDIRECTS and "Location" in response.headers:
                location = response.headers["Location"]
                response.release()
                url = urllib.parse.urljoin(url, location)
                continue
            return self._accept(response, url, offset)
        raise AssertionError("unreachable: policy.check refuses the hop after the last")

    def _accept(self, response: aiohttp.ClientResponse, url: str, offset: int) -> aiohttp.ClientResponse:
        length = response.content_length
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                response.release()
                raise UpstreamError(f"{_shown(url)} answered a range we did not ask for "
                                    f"({response.headers.get('Content-Range')!r}, asked from byte {offset})")
            self.offset = offset
            self.total = int(match.group(3)) if match.group(3) != "*" else None
            self.end = int(match.group(2)) + 1
            if self.part_end is not None:
                self.end = min(self.end, self.part_end)
            return response
        if response.status == 416 and offset:
            match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:  # every byte was here already
                self.offset = self.total = self.end = offset
                return response
        if response.status != 200:
            status = f"{response.status} {response.reason}"
            challenge = response.headers.get("WWW-Authenticate") if response.status == 401 else None
            retry_after = _retry_after(response.headers.get("Retry-After"))
            response.release()
            if response.status == 429 or response.status >= 500:
                raise _Retryable(f"{_shown(url)} answered {status}", retry_after)
            raise UpstreamError(f"{_shown(url)} answered {status}", challenge, response.status)
        self.offset = 0
        self.total = self.end = length
        self.ranges = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
        etag = response.headers.get("ETag")
        # If-Range needs a strong validator: a weak ETag cannot say two versions are the same bytes
        self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        return response

    async def chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body from ``offset`` to the end; a dropped connection is resumed where it stopped."""
        while True:
            try:
                if response.status != 416:
                    async for chunk in response.content.iter_any():
                        if self.end is not None and self.offset + len(chunk) >= self.end:
                            chunk = chunk[:self.end - self.offset]  # a part read from a longer answer
                            self.offset += len(chunk)
                            await self.budget.take(len(chunk))
                            yield chunk
                            break
                        self.offset += len(chunk)
                        await self.budget.take(len(chunk))
                        yield chunk
                response.release()
                if self.end is not None and self.offset < self.end:
                    raise aiohttp.ClientPayloadError(f"the body ended at byte {self.offset} of {self.end}")
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                response.release()
                if self.validator is None:
                    raise UpstreamChanged(f"{_shown(self.url)} dropped at byte {self.offset} and sends no ETag or "
                                          "Last-Modified to resume against; starting over") from None
                self.resumes += 1
                if self.resumes > MAX_RESUMES:
                    raise UpstreamError(f"{_shown(self.url)} dropped {self.resumes} times; last at byte "
                                        f"{self.offset}: {exc or type(exc).__name__}") from None
                logger.info("download from %s dropped at byte %d (%s); resuming with Range and If-Range",
                            _shown(self.url), self.offset, exc or type(exc).__name__)
                at = self.offset
                response = await self._reopen(at)
                if self.offset != at:
                    response.release()
                    raise UpstreamChanged(f"{_shown(self.url)} changed upstream (If-Range {self.validator} no "
                                          f"longer matches) after {at} bytes; starting over") from None


    async def _reopen(self, at: int) -> aiohttp.ClientResponse:
        """Ask again from byte ``at``; an upstream that cannot be reached for a moment is tried again."""
        while True:
            await asyncio.sleep(min(0.2 * self.resumes, 5))
            try:
                return await self.open(at, self.validator, end=self.part_end)
            except UpstreamError as exc:
                self.resumes += 1
                if self.resumes > MAX_RESUMES:
                    raise
                logger.info("resuming %s from byte %d failed (%s); trying again", _shown(self.url), at,
                            exc.detail)


class RegistryAuthLike(Protocol):
    """What a Transfer needs of :class:`~.registry_auth.RegistryAuth`."""

    token: str | None

    async def renew(self, challenge: str | None, sent: str | None) -> None: ...


OnOpen = Callable[[Transfer, bool], Awaitable[None]]
# told the partial file and how many bytes from its start are on disk (written to the OS, hashed or not),
# each time that grows; a smaller number than before means the file started over
OnDisk = Callable[[Path, int], None]
FLUSH_SECONDS = 0.05  # with an OnDisk, a slow upstream's bytes reach the disk at least this often


async def fetch(transfer: Transfer, store: BlobStore, name: str, *, on_open: OnOpen | None = None,
                on_disk: OnDisk | None = None) -> ResumableTemp:
    """One file's whole transfer into ``tmp/downloads/<name>.partial``, hashed as it arrives (``name``:
    a job id, or ``<job>/parts/<n>`` for file n of a multi-file job, see :meth:`BlobStore.partial_path`).

    Returns the partial file, whole, its hasher holding the digest of every byte (for
    :func:`~modelcache.imports.ingest_stream` with ``temp=``; the caller closes it). Resumes from
    what a past attempt or process left (``<name>.json`` holds the upstream's validator and, for a
    download in parts, the parts done). ``on_open(transfer, restarted)`` is awaited once the
    upstream's size is known and before any byte of the body is read: it may refuse (a cache
    that cannot hold it). The file changing upstream starts over, at most ``MAX_RESTARTS`` times.
    ``on_disk(path, size)``: see :data:`OnDisk` (a blob GET streams a file still being fetched from it).
    """
    notes_path = store.partial_path(name).with_suffix(".json")
    notes = await asyncio.to_thread(_read_notes, notes_path)
    fresh = False
    for restart in range(MAX_RESTARTS + 1):
        try:
            if not fresh and notes.get("parts") is not None:
                return await _Parts(transfer, store, name, notes_path, notes, on_disk).resume(on_open, restart > 0)
            return await _fetch_stream(transfer, store, name, notes_path, notes, fresh, on_open, restart > 0,
                                       on_disk)
        except UpstreamChanged as exc:
            if restart == MAX_RESTARTS:
                raise
            logger.info("download %s: %s", name, exc.detail)
            fresh, notes = True, {}
    raise AssertionError("unreachable")


async def _fetch_stream(transfer: Transfer, store: BlobStore, name: str, notes_path: Path, notes: dict,
                        fresh: bool, on_open: OnOpen | None, restarted: bool,
                        on_disk: OnDisk | None = None) -> ResumableTemp:
    """One stream appended to the partial file; switches to parts when the answer allows them."""
    # reopened each attempt: the bytes a past attempt (or process) left are hashed again
    temp = await asyncio.to_thread(store.resumable, name, fresh)
    response = None
    try:
        have = temp.hasher.size
        response = await transfer.open(have, notes.get("validator") if have else None)
        if transfer.offset != have:
            logger.info("download %s: %s sent the whole file instead of the bytes from %d on (it changed, or "
                        "ignores ranges); starting over", name, _shown(transfer.url), have)
            await asyncio.to_thread(temp.restart)
        notes = {"validator": transfer.validator, "total": transfer.total}
        if transfer.offset == 0 and _in_parts(transfer):
            temp.close()
            parts = _Parts(transfer, store, name, notes_path, {**notes, "parts": []}, on_disk)
            first, response = response, None
            return await parts.start(first, on_open, restarted)
        await asyncio.to_thread(_write_notes, notes_path, notes)
        if on_open is not None:
            await on_open(transfer, restarted)
        if on_disk is not None:
            on_disk(temp.path, temp.hasher.size)
        pending = bytearray()
        flushed = time.monotonic()
        async for chunk in transfer.chunks(response):
            pending += chunk
            # hash and write in 1 MiB steps, off the event loop; with on_disk, a slow upstream's
            # bytes are handed to the OS at least every FLUSH_SECONDS for the readers streaming them
            if len(pending) >= CHUNK or (on_disk is not None and time.monotonic() - flushed >= FLUSH_SECONDS):
                await asyncio.to_thread(temp.write if on_disk is None else temp.append, bytes(pending))
                pending.clear()
                flushed = time.monotonic()
                if on_disk is not None:
                    on_disk(temp.path, temp.hasher.size)
        await asyncio.to_thread(temp.write if on_disk is None else temp.append, bytes(pending))
        if on_disk is not None:
            on_disk(temp.path, temp.hasher.size)
        return temp
    except BaseException:
        temp.close()  # kept on disk: the next attempt resumes from it
        raise
    finally:
        if response is not None:
            response.release()  # refused before its body was read (507): let the connection go


def _in_parts(transfer: Transfer) -> bool:
    s = transfer.settings
    return (s.parallel_parts > 1 and transfer.ranges and not transfer.ranges_ignored
            and transfer.validator is not None
            and transfer.total is not None and transfer.total >= s.part_threshold_bytes)


def part_bytes(total: int, parallel: int) -> int:
    """The size of each part: small enough that the hashed prefix follows closely behind the parts
    in flight (about eight parts per connection), big enough that a request's cost does not matter."""
    return min(max(total // (parallel * 8), 8 << 20), 64 << 20)


class _Parts:
    """A file fetched as fixed-size parts over ``parallel_parts`` connections, hashed in order.

    The parts are taken in ascending order by whichever connection is free, each written at its
    offset (``pwrite``) into the partial file, preallocated to the whole size. One hashing thread
    follows the contiguous prefix of finished parts. Finished parts are recorded in the sidecar,
    at most once a second, after an fdatasync.
    """

    def __init__(self, transfer: Transfer, store: BlobStore, name: str, notes_path: Path, notes: dict,
                 on_disk: OnDisk | None = None) -> None:
        self.transfer, self.store, self.name, self.notes_path = transfer, store, name, notes_path
        self.on_disk = on_disk  # told the hashed prefix: contiguous, and on disk (pwrite)
        try:  # from the upstream's answer, or from the sidecar a past attempt left
            self.total: int = int(notes["total"])
            self.validator: str = str(notes["validator"])
            self.size = int(notes.get("part_bytes") or part_bytes(self.total, transfer.settings.parallel_parts))
            self.done: set[int] = {int(start) for start, _ in notes.get("parts", [])}  # offsets of finished parts
        except (KeyError, TypeError, ValueError):
            raise UpstreamChanged(f"{notes_path} is not a download's notes; starting over") from None
        self.path = store.partial_path(name)
        self.hasher = Hasher()
        self.hashed = 0
        self._fd = -1
        self._changed = asyncio.Event()
        self._stopping = False
        self._io: set[asyncio.Future] = set()  # thread calls using the file descriptor, still running
        self._noted_at = 0.0

    async def start(self, first: aiohttp.ClientResponse, on_open: OnOpen | None, restarted: bool) -> ResumableTemp:
        """A fresh download in parts: ``first`` (the whole file's 200) gives the first part's bytes."""
        try:
            await asyncio.to_thread(self._open_file, True)
            if self.on_disk is not None:
                self.on_disk(self.path, 0)
            await self._note(force=True)
            if on_open is not None:
                await on_open(self.transfer, restarted)
        except BaseException:
            first.release()
            self._close()
            raise
        logger.info("download %s: %d bytes from %s in parts of %d bytes, %d at once", self.name, self.total,
                    _shown(self.transfer.url), self.size, self.transfer.settings.parallel_parts)
        return await self._run(first)

    async def resume(self, on_open: OnOpen | None, restarted: bool) -> ResumableTemp:
        """Resume a download in parts from its sidecar: only the parts not recorded as done are asked for."""
        self.transfer.validator, self.transfer.total = self.validator, self.total
        try:
            ok = await asyncio.to_thread(self._open_file, False)
        except FileNotFoundError:
            ok = False
        if not ok:
            raise UpstreamChanged(f"{self.path} is not the {self.total} bytes its notes say; starting over")
        self.transfer.offset = sum(min(self.size, self.total - start) for start in self.done)
        if self.on_disk is not None:
            self.on_disk(self.path, 0)  # its recorded parts are hashed again from byte 0, then handed on
        if on_open is not None:
            try:
                await on_open(self.transfer, True)
            except BaseException:
                self._close()
                raise
        logger.info("download %s: resuming in parts, %d of %d parts done", self.name, len(self.done),
                    -(-self.total // self.size))
        return await self._run(None)

    def _open_file(self, fresh: bool) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SourceChanged(f"{self.path}: another process is writing this download") from None
        if fresh:
            os.ftruncate(fd, 0)
            try:
                os.posix_fallocate(fd, 0, self.total)  # room for every part now, not a full disk at 90 %
            except OSError as exc:
                os.close(fd)
                raise SourceChanged(f"{self.path}: cannot reserve {self.total} bytes: {exc.strerror}") from None
        elif os.fstat(fd).st_size != self.total:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def _run(self, first: aiohttp.ClientResponse | None) -> ResumableTemp:
        starts = [s for s in range(0, self.total, self.size) if s not in self.done]
        queue = iter(starts)
        parallel = self.transfer.settings.parallel_parts
        hashing = asyncio.create_task(self._hash_along(), name=f"hash-{self.name}")
        workers = []
        try:
            if first is not None:
                next(queue)  # part 0 comes from the first answer
                workers.append(asyncio.create_task(self._part(0, first)))
                first = None
            workers += [asyncio.create_task(self._take(queue)) for _ in range(parallel - len(workers))]
            await _all_or_none(workers)
            self._changed.set()
            await hashing
        except BaseException:
            if first is not None:
                first.release()
            self._stopping = True
            self._changed.set()
            for task in workers:
                task.cancel()
            await asyncio.gather(hashing, *workers, return_exceptions=True)
            # a cancelled task's thread call may still be running: the descriptor outlives it
            await asyncio.gather(*self._io, return_exceptions=True)
            try:
                await asyncio.to_thread(self._note_sync)  # what is done stays done for the next attempt
            finally:
                self._close()
            raise
        await self._note(force=True)
        self._close()
        return await asyncio.to_thread(self.store.resumable, self.name, False, self.hasher)

    async def _take(self, queue) -> None:
        for start in queue:
            await self._part(start, None)

    async def _part(self, start: int, response: aiohttp.ClientResponse | None) -> None:
        """Fetch one part (from ``response`` if given, else a ranged request with If-Range)."""
        end = min(start + self.size, self.total)
        part = self.transfer.part()
        at = start
        try:
            while at < end:
                if response is None:
                    response = await part.open(at, self.validator, end=end)
                    if response.status != 206:  # a 200: the If-Range no longer matched, or ranges are ignored
                        if self.validator in (response.headers.get("ETag"), response.headers.get("Last-Modified")):
                            self.transfer.ranges_ignored = True  # the same version: fetch it as one stream
                        raise UpstreamChanged(f"{_shown(part.url)} changed upstream (If-Range {self.validator} no "
                                              f"longer matches) at byte {at}; starting over")
                else:
                    part.offset, part.end, part.part_end = start, end, end
                pending = bytearray()
                async for chunk in part.chunks(response):
                    pending += chunk
                    self.transfer.offset += len(chunk)
                    if len(pending) >= CHUNK:
                        at += await self._thread(_pwrite_all, self._fd, pending, at)
                        pending = bytearray()
                at += await self._thread(_pwrite_all, self._fd, pending, at)
                response.release()
                response = None
                if at < end:
                    part.end = None  # the answer was shorter than asked: ask for the rest
        finally:
            if response is not None:
                response.release()
            self.transfer.retries += part.retries
            self.transfer.resumes += part.resumes
        self.done.add(start)
        self._changed.set()
        await self._note()

    def _prefix(self) -> int:
        """The end of the contiguous run of finished parts from byte 0."""
        at = self.hashed - self.hashed % self.size if self.hashed < self.total else self.total
        while at < self.total and at in self.done:
            at = min(at + self.size, self.total)
        return at

    async def _hash_along(self) -> None:
        while self.hashed < self.total and not self._stopping:
            await self._changed.wait()
            self._changed.clear()
            prefix = self._prefix()
            if prefix > self.hashed:
                await self._thread(self._hash_to, prefix)
                if self.on_disk is not None:
                    self.on_disk(self.path, self.hashed)

    async def _thread(self, fn, *args):
        """``fn`` in a thread; the call is remembered until it ends, even if its caller is cancelled."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io.add(future)
        future.add_done_callback(self._io.discard)
        return await asyncio.shield(future)

    def _hash_to(self, end: int) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while self.hashed < end and not self._stopping:
            n = os.preadv(self._fd, [view[:min(CHUNK, end - self.hashed)]], self.hashed)
            if n <= 0:
                raise SourceChanged(f"{self.path}: ended at byte {self.hashed}, expected {end}")
            self.hasher.update(view[:n])
            self.hashed += n

    async def _note(self, force: bool = False) -> None:
        if force or time.monotonic() - self._noted_at >= NOTES_SECONDS:
            self._noted_at = time.monotonic()
            await self._thread(self._note_sync)

    def _note_sync(self) -> None:
        """Record the finished parts, after they reached the disk (a part recorded is a part held)."""
        done = sorted(self.done)
        os.fdatasync(self._fd)
        _write_notes(self.notes_path, {"validator": self.validator, "total": self.total, "part_bytes": self.size,
                                       "parts": [[s, min(s + self.size, self.total)] for s in done]})

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock before the store's temp takes its own
            self._fd = -1


async def _all_or_none(tasks: list[asyncio.Task]) -> None:
    """Wait for every task; the first failure cancels the rest (the caller does) and is raised."""
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _pwrite_all(fd: int, data: bytes | bytearray, at: int) -> int:
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], at + written)
    return written


def _read_notes(path: Path) -> dict:
    try:
        notes = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return notes if isinstance(notes, dict) else {}


def _write_notes(path: Path, notes: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(notes))
    tmp.replace(path)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _shown(url: str) -> str:
    """A URL for logs and errors: never its user info or query (which may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
