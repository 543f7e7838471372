"""How connections are logged and bounded: one access-log line per request (who, what, which
digest and range, status, bytes, time), one warning line per request aiohttp's parser refused,
and the keep-alive bound on connections that send no whole request."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse
from yarl import URL  # aiohttp's URLs

from ..config import Settings
from ..auth import Subject
from ..digest import Digest
from ..logs import deferred_info, printable
from .blobs.ranges import ByteRange
from .keys import DIGEST, RANGE, SENT, SUBJECT


logger = logging.getLogger("modelcache.access")


def connection_options(settings: Settings) -> dict[str, Any]:
    """What the aiohttp server is started with (``AppRunner(app, **options)``), by the CLI and the tests alike.

    aiohttp 3.14 has no separate header-read timeout: its keep-alive timer runs from a connection's
    start and from each answer until the next request's headers are complete, so one bound closes
    both an idle connection and one that trickles (or never finishes) its request line and headers.
    """
    return {"access_log_class": AccessLogger, "logger": ProtocolLogger(),
            "keepalive_timeout": settings.server.keepalive_timeout}


class ProtocolLogger(logging.LoggerAdapter):
    """aiohttp's connection-level logger (``RequestHandler(logger=...)``).

    A request its parser refused (a bad request line, a malformed or too long header) is answered
    400 by aiohttp and logged there with ``logger.exception``: that is the client's fault, worth one
    warning line, not an error with a traceback. Everything else is logged as aiohttp logs it.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            remote = args[0] if args else "?"
            self.logger.warning("refused a malformed request from %s: %s", remote,
                                printable(" ".join(str(exc_info).split())))
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)

_QUIET = ("/healthz", "/readyz", "/metrics")


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access logger: one :func:`log_request` line per request it answered."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        status = response.status
        if status < 400 and request.path in _QUIET:
            return
        method = request.method
        sent = 0 if method == "HEAD" else request.get(SENT, response.body_length)
        log_request(request.remote, method, request.rel_url, status, request.get(SUBJECT), request.get(DIGEST),
                    request.get(RANGE), sent, time)

    @property
    def enabled(self) -> bool:
        return logging_requests()


def logging_requests() -> bool:
    return logger.isEnabledFor(logging.INFO)


def log_request(remote: str | None, method: str, target: URL | str, status: int, subject: Subject | None,
                digest: Digest | None, byte_range: ByteRange | None, sent: int, seconds: float) -> None:
    """One line per request (who, what, which digest and range, status, bytes, time), for aiohttp's
    answers and protocol.py's alike. Its fields are kept and the line is formatted when the log buffer
    is written (logs.deferred_info): a HEAD takes tens of µs, so the f-string, the target's rendering
    and the control-character check are done in batches, off the request. Call it only when
    :func:`logging_requests`."""
    deferred_info(logger, _line, (remote, method, target, status, subject, digest, byte_range, sent, seconds))


def _line(fields: tuple[str | None, str, URL | str, int, Subject | None, Digest | None, ByteRange | None, int,
                        float]) -> str:
    # the path is the client's: logs.py escapes control characters where lines are written
    remote, method, target, status, subject, digest, byte_range, sent, seconds = fields
    return (f"{remote} {method} {_redacted(str(target))} {status} who={subject or '-'} digest={digest or '-'} "
            f"range={byte_range or '-'} bytes={sent} {seconds * 1000:.1f}ms")


def _redacted(target: str) -> str:
    """The path and query, with a signed URL's signature left out: whoever reads logs must not reuse it."""
    if "signature" not in target.partition("?")[2]:
        return target
    return str(URL(target).update_query(signature="REDACTED"))
