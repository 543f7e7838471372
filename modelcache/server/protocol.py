"""The server's connection protocol: aiohttp's, with the HEAD of a known blob answered as it is parsed.

A puller asks ``HEAD /v1/blobs/<digest>`` before every GET, and a node checks
what it has with thousands of them, so that HEAD is the request the server
answers most. Through aiohttp's request path it cost about 336,000 CPU
instructions, of which aiohttp's own path (a task per request on Python 3.11, the
``Request`` and ``StreamResponse`` objects, routing, the middleware chain) was
214,000 even in an app with one route and nothing else (bench/README.md, "HEAD
cost"). Here the same answer is written from :meth:`Connection.data_received`
right after aiohttp's parser (the same C parser, so nothing about HTTP is parsed
by us) produced the request, with no task, request or response object.

Only the plain case is answered here: an idle keep-alive HTTP/1.1 connection
(no request in progress or queued before it, no upgrade asked, its client
reading what it is sent), ``HEAD /v1/blobs/<digest>`` with no query, no body,
no ``Range``, ``If-Range``, ``If-None-Match`` or ``Expect``, an ``Authorization``
header the catalog accepts, and a blob that subject may read. The answer is byte
for byte what ``blobs/serve.py`` sends (the same header block, then ``Date`` and
``Server`` as aiohttp writes them), counted and logged the same way. Anything
else, including every refusal (401, 403, 404: audited and rendered by the one
error path) goes through aiohttp as before, in order.

It reads a few of aiohttp's protocol attributes (``_waiter``, ``_messages``,
``_paused``, the keep-alive timer), which is why aiohttp is pinned to one minor
version in setup.cfg; tests/test_blob_head.py fails if they change meaning.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from ..digest import Digest
from ..errors import ModelcacheError
from .access import log_request, logging_requests
from .auth import token_holder
from .blobs.serve import blob_headers, servable
from .keys import CATALOG, METRICS

PREFIX = "/v1/blobs/"
# what would change the answer: ranges and conditions are answered by serve.py, Expect by aiohttp
_NOT_PLAIN = ("Range", "If-Range", "If-None-Match", "Expect")


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections are :class:`Connection`: used by ``modelcache serve`` and the tests."""

    @property
    def server(self) -> Any:
        server = super().server
        if server is None:
            return None
        return functools.partial(Connection, server, self.app, loop=server._loop, **server._kwargs)


class Connection(RequestHandler):
    __slots__ = ("_app", "_peer")

    def __init__(self, manager: web.Server, app: web.Application, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._app = app
        self._peer: str | None = None

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._messages or self._paused:
            # a request is being handled or waits: its order is kept; or the client does not read what it
            # was sent (writing paused): aiohttp's path waits for the socket to drain, and stops reading
            super().data_received(data)
            return
        started = self._loop.time()
        self._waiter = None  # parsed without waking start(): what is answered here never reaches it
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        answered = False
        while messages and not self._force_close and not self._paused:  # paused by an answer: the rest drain
            message, payload = messages[0]
            answer = self._blob_head(message, payload, started)
            if answer is None:
                break
            messages.popleft()
            self._parser.message_consumed()
            self._manager.requests_count += 1
            self.transport.write(answer)
            answered = True
        if messages:
            waiter.set_result(None)  # the rest is aiohttp's
        elif answered:  # as start() does after an answer: the keep-alive bound runs from now
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time,
                                                            self._process_keepalive)
            if self._buffer_paused:
                self._resume_reading_if_drained()

    def _blob_head(self, message: Any, payload: Any, started: float) -> bytes | None:
        """The whole answer to a plain authenticated HEAD of a readable blob, or None for aiohttp."""
        if getattr(message, "method", None) != "HEAD" or message.should_close or message.upgrade \
                or payload is not EMPTY_PAYLOAD:
            return None
        version = message.version
        if version == HttpVersion11:
            http10 = False
        elif version == HttpVersion10:  # kept alive by its Connection header (should_close said so): ab's
            http10 = True
        else:
            return None
        path: str = message.path
        headers = message.headers
        authorization = headers.get("Authorization")
        if not path.startswith(PREFIX) or "?" in path or authorization is None \
                or any(name in headers for name in _NOT_PLAIN):
            return None
        app = self._app
        catalog = app[CATALOG]
        try:
            subject = token_holder(catalog, authorization)
            digest = Digest.parse(path[len(PREFIX):])
            entry = servable(digest, catalog.blob(digest), subject)
        except ModelcacheError:
            return None  # refused or unknown: the one error path answers, audits and counts it
        answer = _answer(digest, entry.size, http10) + _date_and_server(rfc822_formatted_time(), http10)
        app[METRICS].count("HEAD", 200)
        if logging_requests():
            if self._peer is None:
                peer = self.transport.get_extra_info("peername")
                self._peer = peer[0] if isinstance(peer, (tuple, list)) else str(peer or "")
            log_request(self._peer, "HEAD", path, 200, subject, digest, None, 0, self._loop.time() - started)
        return answer


@functools.lru_cache(maxsize=4096)
def _answer(digest: Digest, size: int, http10: bool) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in blob_headers(digest, size).items())
    return f"HTTP/1.{0 if http10 else 1} 200 OK\r\n{lines}".encode("ascii")


@functools.lru_cache(maxsize=4)
def _date_and_server(date: str, http10: bool) -> bytes:
    """The headers aiohttp adds last; an HTTP/1.0 answer kept alive says so."""
    keep_alive = "Connection: keep-alive\r\n" if http10 else ""
    return f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n{keep_alive}\r\n".encode("ascii")
