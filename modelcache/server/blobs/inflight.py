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
import logging
import os

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
    if flight is None or flight.failure is not None:
        return None
    request[IN_FLIGHT] = flight
    return BlobEntry(flight.size, "present", flight.promoted)


async def announced(request: web.Request, digest: Digest) -> BlobEntry | None:
    """The entry of a blob another process (``fetchd``) announces it is fetching, as :func:`in_flight`."""
    flight = await AnnouncedFile.find(request.app[STORE], digest)
    if flight is None or flight.failure is not None:
        return None
    request[IN_FLIGHT] = flight
    return BlobEntry(flight.size, "present", flight.promoted)


async def send_in_flight(request: web.Request, response: web.StreamResponse, flight: FlightFile | AnnouncedFile,
                         offset: int, count: int) -> web.StreamResponse:
    """Bytes ``offset`` to ``offset + count`` of a file in flight, as its partial file grows."""
    digest, end, at = flight.digest, offset + count, offset
    generation = flight.generation
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
                generation = flight.generation  # nothing sent yet: follow the new bytes
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
                data = await asyncio.to_thread(os.pread, fd, min(ready - at, CHUNK), at)
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


async def _open(request: web.Request, flight: FlightFile | AnnouncedFile) -> int:
    """The file's descriptor: the partial file (renamed when verified), else the committed blob."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OPEN_SECONDS
    while True:
        for path in (flight.path, request.app[STORE].path_for(flight.digest)):
            if path is None:
                continue
            try:
                return await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
        if loop.time() > deadline:
            raise ConnectionResetError(f"blob {flight.digest} is neither at {flight.path} nor in the store")
        await asyncio.sleep(0.05)
