"""Errors become HTTP answers here, and only here: one middleware, one renderer per protocol.

``/v1`` and everything else answer RFC 9457 ``application/problem+json``; a
protocol mounted under a prefix (``/v2``: OCI error bodies, ``/hf``: the Hub's
``X-Error-Code`` headers) registers its own :class:`Renderer` with
:func:`mount`. What every protocol shares is written once, in the middleware:

- an unexpected exception is logged once with its traceback and answered as a
  500 in the protocol's form (never aiohttp's text/plain page), so the request
  counter sees it too;
- other 5xx answers are logged as one line (a database outage as a warning:
  it is the database's fault, and it says so);
- a 401 carries the protocol's ``WWW-Authenticate`` challenges;
- HEAD: aiohttp sends the headers of the rendered answer and no body;
- every answer is counted (``modelcache_http_requests_total``), rendered errors included. Counting
  here rather than in a middleware of its own saves a HEAD a layer of aiohttp's middleware calls.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

from ..errors import DatabaseUnavailable, ModelcacheError, Unauthorized
from .keys import METRICS

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class HttpError(ModelcacheError):
    """An answer aiohttp raised itself (no route, method not allowed, body too large), as one of ours."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title


class InternalError(ModelcacheError):
    """A bug: the traceback is in the log, the client gets this."""


@dataclass(frozen=True)
class Renderer:
    """How one protocol answers an error: the response, and the challenges a 401 carries."""

    render: Callable[[web.Request, ModelcacheError], web.Response]
    challenges: Callable[[web.Request], list[str]] = field(default=lambda request: [])


def problem(request: web.Request, exc: ModelcacheError) -> web.Response:
    """RFC 9457 problem+json, the ``/v1`` form."""
    body = {**(exc.extensions or {}), "type": "about:blank", "title": exc.title, "status": exc.status,
            "detail": exc.detail, "instance": request.path}
    return web.Response(status=exc.status, text=json.dumps(body), content_type=PROBLEM_JSON)


PROBLEMS = Renderer(problem, lambda request: ['Bearer realm="modelcache"'])
RENDERERS = web.AppKey("error_renderers", dict)


def mount(app: web.Application, prefix: str, renderer: Renderer) -> None:
    """Answer errors of requests under ``prefix`` (e.g. ``/v2``) with ``renderer``."""
    app.setdefault(RENDERERS, {})[prefix] = renderer


def renderer_for(request: web.Request) -> Renderer:
    path = request.path
    for prefix, renderer in request.app.get(RENDERERS, {}).items():
        if path == prefix or path.startswith(prefix + "/"):
            return renderer
    return PROBLEMS


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ModelcacheError as exc:
        error = exc
        if exc.status >= 500:
            log = logger.warning if isinstance(exc, DatabaseUnavailable) else logger.error
            log("%s %s failed: %s", request.method, request.path, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            request.app[METRICS].count(request.method, exc.status)
            raise
        error = HttpError(exc.status, exc.reason, exc.text or exc.reason)
    except ConnectionError:  # the client is gone: there is no one to answer
        raise
    except Exception:
        logger.exception("%s %s failed with an unexpected error", request.method, request.path)
        error = InternalError(f"{request.method} {request.path} failed with an unexpected error; "
                              "the server log has the details")
    else:
        request.app[METRICS].count(request.method, response.status)
        return response
    renderer = renderer_for(request)
    response = renderer.render(request, error)
    if isinstance(error, Unauthorized):
        for challenge in renderer.challenges(request):
            response.headers.add("WWW-Authenticate", challenge)
    request.app[METRICS].count(request.method, response.status)
    return response


def header_text(text: str) -> str:
    """A header value: one line of ASCII (what requests name may hold anything)."""
    return " ".join(text.encode("ascii", "backslashreplace").decode().split())
