"""``GET``/``HEAD /v1/blobs/sha256:<hex>``: blobs by digest, with ranges, served by sendfile.

HEAD and every header are answered from the in-memory catalog; only a GET
opens the file, and its bytes go from the page cache to the socket with
``loop.sendfile`` (no copy through Python, flat memory per client).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from aiohttp import web

from ...auth import Subject
from ...digest import Digest
from ...errors import Forbidden, NotFound
from ..auth import authenticate
from ..catalog import BlobEntry
from ..keys import CATALOG, DIGEST, METRICS, RANGE, SENT, STORE
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
    return servable(digest, await request.app[CATALOG].lookup(digest), subject)


async def get_blob(request: web.Request) -> web.StreamResponse:
    subject = authenticate(request)
    digest = Digest.parse(request.match_info["digest"])
    request[DIGEST] = digest
    entry = await servable_blob(request, digest, subject)
    return await send_blob(request, digest, entry.size)


async def send_blob(request: web.Request, digest: Digest, size: int,
                    extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Answer a GET or HEAD for a blob the caller may read (shared with the OCI and HF routes).

    ``extra_headers`` go on every answer (200, 206, 304, 416) and may replace the defaults; an
    ``ETag`` given there is the one ``If-None-Match`` and ``If-Range`` are compared with.
    """
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Docker-Content-Digest": str(digest),
        "Cache-Control": CACHE_CONTROL,
        "Content-Type": "application/octet-stream",
    }
    headers.update(extra_headers or {})
    etag = headers["ETag"]
    if _matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=headers)
    byte_range = None
    if request.headers.get("If-Range", etag) == etag:
        try:
            byte_range = parse_range(request.headers.get("Range"), size)
        except Unsatisfiable:
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range(size)
        status, offset, count = 206, byte_range.start, byte_range.length
        request[RANGE] = byte_range
    else:
        status, offset, count = 200, 0, size
    headers["Content-Length"] = str(count)
    response = web.StreamResponse(status=status, headers=headers)
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    request.app[CATALOG].record_access(digest)
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
