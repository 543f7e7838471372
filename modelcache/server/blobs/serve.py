"""``GET``/``HEAD /v1/blobs/sha256:<hex>``: blobs by digest, with ranges, served by sendfile.

HEAD and every header are answered from the in-memory catalog; only a GET
opens the file, and its bytes go from the page cache to the socket with
``loop.sendfile`` (no copy through Python, flat memory per client).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from types import MappingProxyType
from typing import Mapping

from aiohttp import web

from ...auth import Subject
from ...digest import Digest
from ...errors import Forbidden, NotFound
from ..auth import authenticate
from ..catalog import BlobEntry
from ..keys import CATALOG, DIGEST, IN_FLIGHT, METRICS, RANGE, SENT, STORE
from .inflight import announced, in_flight, send_in_flight
from .ranges import Unsatisfiable, parse_range

logger = logging.getLogger(__name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"


def servable(digest: Digest, entry: BlobEntry | None, subject: Subject) -> BlobEntry:
    """The blob's entry if this subject may have its bytes, else the error to answer."""
    if entry is None or entry.state == "evicted":
        raise NotFound(f"blob {digest} is not in the cache")
    if entry.state == "quarantined":
        raise NotFound(f"blob {digest} is quarantined: it failed verification and is not served")
    reason = subject.withheld("promoted" if entry.promoted else "staged")
    if reason is not None:
        raise Forbidden(f"blob {digest} {reason}")
    return entry


async def servable_blob(request: web.Request, digest: Digest, subject: Subject) -> BlobEntry:
    """:func:`servable` for the blob routes (/v1, /v2, /hf): the catalog's entry, asked of the registry
    on a miss (:meth:`Catalog.lookup`), so content another process just imported is served too."""
    catalog = request.app[CATALOG]
    entry = catalog.blob(digest)  # a hit (nearly every request) needs no await
    if entry is None:
        entry = await catalog.lookup(digest)
    if entry is None or entry.state == "evicted":
        # still being fetched, here or by another process (fetchd): streamed (inflight.py)
        entry = in_flight(request, digest) or await announced(request, digest) or entry
    return servable(digest, entry, subject)


async def get_blob(request: web.Request) -> web.StreamResponse:
    subject = authenticate(request)
    digest = Digest.parse(request.match_info["digest"])
    request[DIGEST] = digest
    entry = await servable_blob(request, digest, subject)
    return await send_blob(request, digest, entry.size)


@functools.lru_cache(maxsize=4096)
def blob_headers(digest: Digest, size: int) -> Mapping[str, str]:
    """The headers of a whole-blob answer, which never change for a digest: built once per blob
    (a client pulling a blob asks for it again and again, a HEAD before each GET)."""
    return MappingProxyType({
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Docker-Content-Digest": str(digest),
        "Cache-Control": CACHE_CONTROL,
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    })


async def send_blob(request: web.Request, digest: Digest, size: int,
                    extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Answer a GET or HEAD for a blob the caller may read (shared with the OCI and HF routes).

    ``extra_headers`` go on every answer (200, 206, 304, 416) and may replace the defaults; an
    ``ETag`` given there is the one ``If-None-Match`` and ``If-Range`` are compared with.
    """
    response = web.StreamResponse(headers=blob_headers(digest, size))
    headers = response.headers
    if extra_headers:
        headers.update(extra_headers)
    etag = headers["ETag"]
    asked = request.headers
    if _matches(asked.get("If-None-Match"), etag):
        del headers["Content-Length"]
        return web.Response(status=304, headers=headers)
    byte_range = None
    range_header = asked.get("Range")
    if range_header is not None and asked.get("If-Range", etag) == etag:
        try:
            byte_range = parse_range(range_header, size)
        except Unsatisfiable:
            del headers["Content-Length"]
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
    if byte_range is None:
        offset, count = 0, size
    else:
        response.set_status(206)
        offset, count = byte_range.start, byte_range.length
        headers["Content-Range"] = byte_range.content_range(size)
        headers["Content-Length"] = str(count)
        request[RANGE] = byte_range
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    request.app[CATALOG].record_access(digest)
    if IN_FLIGHT in request:
        return await send_in_flight(request, response, request[IN_FLIGHT], offset, count)
    return await _sendfile(request, response, digest, offset, count)


async def _sendfile(request: web.Request, response: web.StreamResponse, digest: Digest,
                    offset: int, count: int) -> web.StreamResponse:
    path = request.app[STORE].path_for(digest)
    try:
        f = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        logger.error("blob %s is registered but missing on disk at %s", digest, path)
        raise NotFound(f"blob {digest} is missing on disk") from None
    try:
        await response.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return response
        if count:
            try:
                await asyncio.get_running_loop().sendfile(transport, f, offset, count)
            except ConnectionError as exc:
                # Not a server fault: clients hang up mid-body, and Ollama does on every blob (it only
                # reads the headers of its whole-body GET, for the Location).
                logger.info("client %s closed the connection while blob %s (bytes %d-%d) was sent: %s",
                            request.remote, digest, offset, offset + count - 1, exc.strerror or exc)
                return response
        request[SENT] = count
        request.app[METRICS].bytes_served.inc(count)
        await response.write_eof()
    finally:
        f.close()
    return response


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags
