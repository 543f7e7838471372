"""The overview page: how full the cache is and with what, traffic, the import folder, readiness."""

from __future__ import annotations

from aiohttp import web

from .pages import Ui, page


@page("/ui/", "overview.html")
async def overview(request: web.Request, ui: Ui) -> dict:
    return {}
