"""The Downloads page: the list by state, paged, with live progress; approve, reject with a reason,
cancel; a new download from a source the policy allows.

Every action is ``ui.invoke`` of the ``/v1/downloads`` endpoint the API and the CLI call (its role
check, its rules, its audit): this module only shapes forms into those calls and their answers into
the page. A refusal (the requester approving their own download, a state that moved on, a source the
policy refuses) is shown on the page with the endpoint's own words and status.

``/ui/downloads/rows`` renders the table body alone, from the same template: ``live.js`` fetches it
every second while the tab is visible and swaps in the rows that changed.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from multidict import MultiDictProxy

from ...downloads.policy import allowed_in_order
from ...downloads.sources import Source
from ...errors import ModelcacheError
from ...formats import ARTIFACT_TYPES
from ..keys import SETTINGS
from ..v1 import admin, downloads as v1
from ..v1.api import Handler
from .pages import Ui, form, page, render, see_other

PAGE_SIZE = 25
OPEN = ("pending_approval", "queued", "running")
DONE = {"approve": "approved", "reject": "rejected", "cancel": "cancelled", "new": "requested"}  # by form verb
_NEW_FIELDS = ("source", "reference", "model", "version", "vendor", "artifact_type", "sha256")


def _filters(query: Any) -> dict[str, str]:
    """The list's own query parameters (state, source, cursor), as given: the v1 endpoint parses them."""
    return {k: query[k] for k in ("state", "source", "cursor") if isinstance(query.get(k), str) and query[k]}


def _back(data: MultiDictProxy) -> dict[str, str]:
    """The filters of the list a form was posted from (its hidden ``back`` field, a query string)."""
    raw = data.get("back")
    return _filters(dict(parse_qsl(raw))) if isinstance(raw, str) else {}


async def _listing(ui: Ui, filters: dict[str, str]) -> dict[str, Any]:
    found = await ui.invoke(v1.list_downloads, query={"limit": str(PAGE_SIZE), **filters})
    first_page = {k: v for k, v in filters.items() if k != "cursor"}
    return {"downloads": found.downloads, "next_cursor": found.next_cursor, "filters": filters,
            "query": urlencode(filters), "open_states": OPEN, "first_page": urlencode(first_page),
            "next_page": urlencode({**first_page, "cursor": found.next_cursor}) if found.next_cursor else None,
            "may_approve": ui.may(v1.approve_download), "may_reject": ui.may(v1.reject_download),
            "may_cancel": ui.may(v1.cancel_download)}


async def _offered_sources(request: web.Request, ui: Ui) -> list[Source]:
    """The configured sources ``models.download.allowed_sources`` allows, in its order."""
    prefs = await ui.invoke(admin.list_preferences)
    allowed = next((p.value for p in prefs.preferences if p.key == "models.download.allowed_sources"), [])
    return allowed_in_order((Source(s) for s in request.app[SETTINGS].sources.values()), allowed or [])


async def _context(request: web.Request, ui: Ui, filters: dict[str, str], *, error: str | None = None,
                   entered: dict[str, str] | None = None) -> dict[str, Any]:
    context = await _listing(ui, filters)
    may_request = ui.may(v1.create_download)
    context.update(
        states=v1.STATES, source_ids=sorted(request.app[SETTINGS].sources), artifact_types=ARTIFACT_TYPES, error=error, entered=entered or {}, may_request=may_request,
        sources=await _offered_sources(request, ui) if may_request else [],
        configured=bool(request.app[SETTINGS].sources))
    return context


@page("/ui/downloads", "downloads.html")
async def downloads_page(request: web.Request, ui: Ui) -> dict:
    return await _context(request, ui, _filters(request.query))


@page("/ui/downloads/rows", "download_rows.html", fragment=True)
async def download_rows(request: web.Request, ui: Ui) -> dict:
    """The table body alone, for live.js: the same rows the page renders."""
    return await _listing(ui, _filters(request.query))


async def _act(request: web.Request, ui: Ui, data: MultiDictProxy, verb: str, handler: Handler, *,
               params: dict[str, str] | None = None, body: Any = None) -> web.StreamResponse:
    """Invoke a /v1 download endpoint; on success back to the list, on a refusal the list with its words."""
    filters = _back(data)
    try:
        row = await ui.invoke(handler, params=params, body=body)
    except ModelcacheError as exc:
        if not ui.may(v1.list_downloads):
            raise  # a role that may not even list downloads gets the plain error page
        entered = {k: v for k, v in data.items() if k in _NEW_FIELDS and isinstance(v, str)} if verb == "new" \
            else None
        context = await _context(request, ui, filters, error=exc.detail, entered=entered)
        return render(request, "downloads.html", {**ui.context(), **context}, status=exc.status)
    name = f"{row.vendor + '/' if row.vendor else ''}{row.model}:{row.version}"
    state = row.state.replace("_", " ")
    ui.tell(f"Download {row.id} ({name}) {DONE[verb]}{'' if state == DONE[verb] else ': ' + state}.")
    return see_other(f"/ui/downloads{'?' + urlencode(filters) if filters else ''}#dl-{row.id}")


@form("/ui/downloads/{download_id}/approve")
async def approve(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    return await _act(request, ui, data, "approve", v1.approve_download, params=dict(request.match_info))


@form("/ui/downloads/{download_id}/reject")
async def reject(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    reason = data.get("reason")
    return await _act(request, ui, data, "reject", v1.reject_download, params=dict(request.match_info),
                      body={"reason": reason.strip() if isinstance(reason, str) else reason})


@form("/ui/downloads/{download_id}/cancel")
async def cancel(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    return await _act(request, ui, data, "cancel", v1.cancel_download, params=dict(request.match_info))


@form("/ui/downloads/new")
async def new_download(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    body = {}
    for name in _NEW_FIELDS:
        value = data.get(name)
        if isinstance(value, str) and value.strip():
            body[name] = value.strip()
    return await _act(request, ui, data, "new", v1.create_download, body=body)
