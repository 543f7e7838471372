"""One access-log line per request: who, what, which digest and range, status, bytes, time."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .keys import DIGEST, RANGE, SENT, SUBJECT

logger = logging.getLogger("modelcache.access")

_QUIET = ("/healthz", "/readyz", "/metrics")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.path in _QUIET and response.status < 400:
            return
        subject = request.get(SUBJECT)
        digest = request.get(DIGEST)
        byte_range = request.get(RANGE)
        logger.info(
            "%s %s %s %d who=%s digest=%s range=%s bytes=%d %.1fms",
            request.remote, request.method, request.path_qs, response.status,
            subject or "-", digest or "-", byte_range or "-",
            0 if request.method == "HEAD" else request.get(SENT, response.body_length), time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return logger.isEnabledFor(logging.INFO)
