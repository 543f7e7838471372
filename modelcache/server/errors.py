"""Domain errors become HTTP answers here, and only here (RFC 9457 problem+json)."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from ..errors import ModelcacheError, Unauthorized

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            request: web.Request | None = None) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if request is not None:
        body["instance"] = request.path
    if request is not None and request.method == "HEAD":
        return web.Response(status=status, headers=headers, content_type=PROBLEM_JSON)
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_JSON, headers=headers)


@web.middleware
async def problems_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ModelcacheError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="modelcache"'} if isinstance(exc, Unauthorized) else None
        if exc.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.path, exc.detail)
        return problem(exc.status, exc.title, exc.detail, headers, request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == PROBLEM_JSON:
            raise
        return problem(exc.status, exc.reason, exc.text or exc.reason, None, request)
