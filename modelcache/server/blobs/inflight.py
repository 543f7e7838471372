"""A blob GET for content a download of this process is still fetching: answered at once, bytes as they arrive.

The registry of files in flight is ``downloads/inflight.py`` (digest -> partial file, declared size,
how far the bytes on disk reach; for a download running in another process, ``fetchd``, its
announcement on disk, :func:`announced`). :func:`in_flight` gives :func:`~.serve.servable_blob` an entry for
such a digest (the declared size; promoted or staged as its artifact will be, so the one rule,
``Subject.withheld``, decides who may read it), and :func:`send_in_flight` is what
:func:`~.serve.send_blob` does instead of sendfile: the headers (200 with the declared
``Content-Length``, or 206 for a range) go out at once, then the bytes follow the partial file as it
grows. The answer's last byte is held until the whole file matched its declared sha256; if it does
not (or the download stops, or the upstream's file changes under it), the connection is closed
before the declared length, so the client sees a short body, never a complete-looking wrong one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
from pathlib import Path

from aiohttp import web

from ...digest import Digest
from ...downloads.inflight import FLIGHTS, AnnouncedFile, FlightFile
from ...hashing import CHUNK
from ..catalog import BlobEntry
from ..keys import IN_FLIGHT, METRICS, SENT, STORE

logger = logging.getLogger(__name__)

ALIVE_SECONDS = 1.0  # a waiting answer looks this often whether its client is still there
OPEN_SECONDS = 5.0  # how long a verified file may be between the staging folder and the store


def in_flight(request: web.Request, digest: Digest) -> BlobEntry | None:
    """The entry of a blob this process is fetching (remembered on the request for :func:`send_in_flight`)."""
    flight = FLIGHTS.file(request.app[STORE].root, digest)
    if not _streamable(flight):
        return None
    request[IN_FLIGHT] = flight
    return BlobEntry(flight.size, "present", flight.promoted)


async def announced(request: web.Request, digest: Digest) -> BlobEntry | None:
    """The entry of a blob another process (``fetchd``) announces it is fetching, as :func:`in_flight`."""
    flight = await AnnouncedFile.find(request.app[STORE], digest)
    if not _streamable(flight):
        return None
    request[IN_FLIGHT] = flight
    return BlobEntry(flight.size, "present", flight.promoted)


def _streamable(flight: FlightFile | AnnouncedFile | None) -> bool:
    """Not failed, and with a last byte to hold back: an empty file's answer is whole with its headers, so
    one declared empty is not answered before it is verified (and then it is the store's)."""
    return flight is not None and flight.failure is None and (flight.size > 0 or flight.verified)


async def send_in_flight(request: web.Request, response: web.StreamResponse, flight: FlightFile | AnnouncedFile,
                         offset: int, count: int) -> web.StreamResponse:
    """Bytes ``offset`` to ``offset + count`` of a file in flight, as its partial file grows."""
    digest, end, at = flight.digest, offset + count, offset
    generation = flight.generation
    # Another process's file is followed by polling its announcement, which can miss a start over (a fetchd
    # killed and started again announces generation 0 again; a restart, commit and the announcement's
    # removal can all fall between two polls): what was sent is hashed, and checked against the verified
    # file before the last byte goes.
    sent = hashlib.sha256() if isinstance(flight, AnnouncedFile) else None
    await response.prepare(request)
    fd = -1
    try:
        while at < end:
            changed = flight.changed()  # taken before the state it follows is read
            transport = request.transport
            if transport is None or transport.is_closing():
                logger.info("client %s went away at byte %d of blob %s (bytes %d-%d), still being fetched",
                            request.remote, at, digest, offset, end - 1)
                return response
            if flight.generation != generation and at == offset:
                generation = flight.generation  # nothing sent yet: follow the new bytes (at their path)
                if fd >= 0:
                    os.close(fd)
                    fd = -1
            if flight.failure is not None or flight.generation != generation:
                why = flight.failure or "the upstream's file changed and its download started over"
                logger.warning("blob %s: the answer to %s is cut off at byte %d of bytes %d-%d, because the "
                               "download fetching it did not give the declared content: %s", digest, request.remote,
                               at, offset, end - 1, why)
                transport.abort()  # short of Content-Length: the client knows the body is not whole
                return response
            # every byte but the answer's last as it reaches the disk; the last once the sha256 matched
            ready = flight.available if flight.verified else min(flight.available, end - 1)
            if ready > at:
                if fd < 0:
                    fd = await _open(request, flight)
                    if fd < 0:  # an answer left open would wait for its missing bytes until keep-alive ends
                        logger.warning("blob %s: the answer to %s is cut off at byte %d of bytes %d-%d: it is "
                                       "neither at %s nor in the store", digest, request.remote, at, offset,
                                       end - 1, flight.path)
                        transport.abort()
                        return response
                data = await asyncio.to_thread(_read, fd, min(ready - at, CHUNK), at, sent)
                if data and sent is not None and at + len(data) == end \
                        and not await asyncio.to_thread(_as_verified, request.app[STORE].path_for(digest), flight,
                                                        sent, offset, end):
                    logger.warning("blob %s: the answer to %s is cut off at byte %d of bytes %d-%d, because the "
                                   "bytes sent are not the verified file's (the download started over unseen)",
                                   digest, request.remote, at, offset, end - 1)
                    transport.abort()
                    return response
                if data:
                    await response.write(data)
                    at += len(data)
                    continue
            try:
                await asyncio.wait_for(changed.wait(), ALIVE_SECONDS)
            except TimeoutError:
                pass
        await response.write_eof()
    except ConnectionError as exc:
        logger.info("client %s closed the connection at byte %d of blob %s (bytes %d-%d), still being fetched: %s",
                    request.remote, at, digest, offset, end - 1, exc)
        return response
    finally:
        flight.release()
        if fd >= 0:
            os.close(fd)
        request[SENT] = at - offset
        request.app[METRICS].bytes_served.inc(at - offset)
    return response


def _read(fd: int, count: int, at: int, sent: "hashlib._Hash | None") -> bytes:
    data = os.pread(fd, count, at)
    if sent is not None:
        sent.update(data)
    return data


def _as_verified(blob: Path, flight: AnnouncedFile, sent: "hashlib._Hash", offset: int, end: int) -> bool:
    """Whether bytes ``offset`` to ``end`` as sent (``sent``: their sha256, the last chunk's included) are
    the verified file's: the whole file's sha256 is its digest; a range is compared with the same range of
    the committed blob (or the file its writer announced verified)."""
    if offset == 0 and end == flight.size:
        return sent.hexdigest() == flight.digest.hex
    verified = hashlib.sha256()
    for path in (blob, flight.path):
        if path is None or (fd := _open_file(path)) < 0:
            continue
        try:
            at = offset
            while at < end:
                data = os.pread(fd, min(end - at, CHUNK), at)
                if not data:
                    return False
                verified.update(data)
                at += len(data)
        finally:
            os.close(fd)
        return verified.digest() == sent.digest()
    return False


async def _open(request: web.Request, flight: FlightFile | AnnouncedFile) -> int:
    """The file's descriptor: the partial file (renamed when verified), else the committed blob; -1 if
    neither is there within OPEN_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OPEN_SECONDS
    while True:
        for path in (flight.path, request.app[STORE].path_for(flight.digest)):
            if path is not None and (fd := await asyncio.to_thread(_open_file, path)) >= 0:
                return fd
        if loop.time() > deadline:
            return -1
        await asyncio.sleep(0.05)


def _open_file(path: Path) -> int:
    """A descriptor of the regular file at ``path``, or -1: absent, or not what a download writes there (a
    symbolic link is not followed, a FIFO not waited on; the path may come from another process's
    announcement)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd
