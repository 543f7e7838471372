"""One access-log line per request: who, what, which digest and range, status, bytes, time."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from ..logs import fast_info
from .keys import DIGEST, RANGE, SENT, SUBJECT

logger = logging.getLogger("modelcache.access")

_QUIET = ("/healthz", "/readyz", "/metrics")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.path in _QUIET and response.status < 400:
            return
        sent = 0 if request.method == "HEAD" else request.get(SENT, response.body_length)
        fast_info(logger, f"{request.remote} {request.method} {_redacted(request)} {response.status} "
                          f"who={request.get(SUBJECT) or '-'} digest={request.get(DIGEST) or '-'} "
                          f"range={request.get(RANGE) or '-'} bytes={sent} {time * 1000:.1f}ms")

    @property
    def enabled(self) -> bool:
        return logger.isEnabledFor(logging.INFO)


def _redacted(request: BaseRequest) -> str:
    """The path and query, with a signed URL's signature left out: whoever reads logs must not reuse it."""
    if "signature" not in request.query_string:
        return request.path_qs
    return str(request.rel_url.update_query(signature="REDACTED"))
