"""The one rule for URLs this server hands out (Link headers, Location, the token realm).

They start with ``server.public_url`` when one is configured (a proxy or a
name fronts the cache); otherwise with the scheme and host the client asked,
which is the one address known to reach us from where the client is.
"""

from __future__ import annotations

from aiohttp import web

from .keys import SETTINGS


def public_base(request: web.Request) -> str:
    configured = request.app[SETTINGS].server.public_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"
