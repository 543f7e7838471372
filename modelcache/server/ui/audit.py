"""The audit log, newest first: filtered by action, subject, decision and time, paged with the cursor of
``GET /v1/audit`` (whose query this page fills in and invokes)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ...errors import InvalidInput
from ..v1 import admin
from ..v1.api import ValidationProblem
from .pages import Ui, page

FILTERS = ("action", "subject", "decision", "since", "until")
PAGE = 50  # events per page
_LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?")  # what <input type=datetime-local> sends


def _as_utc(value: str) -> str:
    """A datetime-local value has no zone: the page says times are UTC, so it is read as UTC."""
    return value + "Z" if _LOCAL_TIME.fullmatch(value) else value


@page("/ui/audit", "audit.html")
async def audit(request: web.Request, ui: Ui) -> dict[str, Any]:
    filters = {name: request.query.get(name, "").strip() for name in FILTERS}
    context: dict[str, Any] = {"filters": filters, "events": [], "next_page": None, "error": None,
                               "allowed": ui.may(admin.list_audit)}
    if not context["allowed"]:
        return context  # said on the page; not asked of /v1, which would refuse (and audit) every visit
    query = {name: _as_utc(value) if name in ("since", "until") else value
             for name, value in filters.items() if value}
    query["limit"] = str(PAGE)
    if request.query.get("cursor"):
        query["cursor"] = request.query["cursor"]
    try:
        result: admin.AuditPage = await ui.invoke(admin.list_audit, query=query)
    except (ValidationProblem, InvalidInput) as exc:
        context["error"] = exc.detail
        return context
    context["events"] = result.events
    if result.next_cursor:
        context["next_page"] = urlencode({**{k: v for k, v in filters.items() if v}, "cursor": result.next_cursor})
    return context
