"""How a dashboard page is written: ``@page`` for what a browser reads, ``@form`` for what it posts.

::

    @page("/ui/models", "models.html")
    async def models(request: web.Request, ui: Ui) -> dict:
        page = await ui.invoke(registry.list_artifacts, query={"limit": "50"})
        return {"artifacts": page.artifacts}

    @form("/ui/models/promote")
    async def promote(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
        await ui.invoke(registry.promote, params={"artifact": data["artifact"]})
        raise web.HTTPSeeOther("/ui/models")

Both require a signed-in session (a browser without one is sent to the sign-in
page). ``@form`` also checks the session's CSRF token (the hidden ``csrf`` field
every template's forms carry; missing or wrong is a 403 page and an audited
denial). Actions go through ``ui.invoke``: the same ``/v1`` endpoint code the API
and the CLI run, with its role check, parsing and auditing (api.invoke). A
template gets ``subject``, ``role``, ``csrf``, ``path`` and ``may(handler)``
(whether this role may call that endpoint: offer only what it may) besides what
the page returns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from ...auth import Subject
from ...db import audit
from ...errors import DatabaseUnavailable, Forbidden
from ...logs import printable
from ..keys import DATABASE
from ..v1 import admin, api
from ..v1 import downloads as v1_downloads
from . import session as sessions

logger = logging.getLogger(__name__)

ROUTES: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = []

# No inline script or style anywhere: what the page runs and how it looks come from /ui/static only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Ui:
    """The signed-in browser behind a request: who it is, its session, and the one road to actions."""

    request: web.Request
    session: sessions.Session
    subject: Subject

    async def invoke(self, handler: api.Handler, *, body: Any = None, query: Mapping[str, Any] | None = None,
                     params: Mapping[str, str] | None = None) -> Any:
        """Call the ``/v1`` endpoint declared for ``handler`` as this subject (see api.invoke)."""
        return await api.invoke(api.endpoint_for(handler), self.request, self.subject, body=body, query=query,
                                params=params)

    def may(self, handler: api.Handler) -> bool:
        return api.allows(api.endpoint_for(handler), self.subject)

    def tell(self, notice: str) -> None:
        """Say ``notice`` on the next page this browser sees (after a form's redirect)."""
        self.session.notices.append(notice)

    def context(self, *, take_notices: bool = True) -> dict[str, Any]:
        notices: list[str] = []
        if take_notices:
            notices, self.session.notices = self.session.notices, []
        return {"subject": self.subject, "role": self.subject.role.value, "csrf": self.session.csrf,
                "path": self.request.path, "may": self.may, "notices": notices, "sections": sections(self.subject)}


# The navigation: a section whose list a role may not read (the /v1 endpoint named) is not offered.
SECTIONS: list[tuple[str, str, api.Handler | None]] = [
    ("/ui/", "Overview", None), ("/ui/models", "Models", None),
    ("/ui/downloads", "Downloads", v1_downloads.list_downloads), ("/ui/nodes", "Nodes", None),
    ("/ui/audit", "Audit", admin.list_audit), ("/ui/policy", "Policy", None)]


def sections(subject: Subject) -> list[tuple[str, str]]:
    """The navigation this subject is offered: (href, label)."""
    return [(href, label) for href, label, reads in SECTIONS
            if reads is None or api.allows(api.endpoint_for(reads), subject)]


PageHandler = Callable[[web.Request, Ui], Awaitable[dict[str, Any] | web.StreamResponse]]
FormHandler = Callable[[web.Request, Ui, MultiDictProxy], Awaitable[web.StreamResponse]]


def signed_in(request: web.Request) -> Ui:
    """The request's Ui, or a redirect to the sign-in page (which comes back here afterwards)."""
    found = sessions.current(request)
    if found is None:
        target = request.path_qs if request.method == "GET" else "/ui/"
        raise web.HTTPSeeOther(f"/ui/signin?next={quote(target, safe='')}")
    return Ui(request, *found)


# A path with its query as a URL carries it: printable ASCII, no spaces or backslashes (no header breaks,
# nothing a browser reads as another host).
_URL_PATH = re.compile(r"/[!#-\[\]-~]*")


def local_target(value: object, under: str, default: str) -> str:
    """Where a browser is sent back to (``next``, ``back``: values a link can carry): ``value`` if it is a
    path of ours under ``under`` as a URL spells it, never another site (``//evil``, ``/\\evil``) nor a
    line break that would end the Location header; else ``default``."""
    if isinstance(value, str) and value.startswith(under) and _URL_PATH.fullmatch(value) and "//" not in value:
        return value
    return default


def see_other(location: str) -> web.Response:
    """303 to ``location``: where a form's POST sends the browser (a reload does not post again). Returned,
    not raised, so cookies set on it are sent."""
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    signed_out = {"subject": None, "role": None, "csrf": None, "path": request.path, "may": lambda handler: False,
                  "notices": []}
    response = aiohttp_jinja2.render_template(template, request, {**signed_out, **context}, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def page(path: str, template: str, *, fragment: bool = False) -> Callable[[PageHandler], PageHandler]:
    """A GET page for signed-in browsers; the handler returns the template's context (or a response).

    A ``fragment`` is one part of a page (its template renders one element, with the ``id`` of the
    part it replaces) for ``static/live.js`` to fetch about once a second while the tab is visible.
    It is a page in every respect except that it leaves the session's notices for the next whole
    page: live.js polls while a form's redirect is on its way, and must not swallow what that form
    has to say.
    """

    def register(handler: PageHandler) -> PageHandler:
        async def handle(request: web.Request) -> web.StreamResponse:
            ui = signed_in(request)
            result = await handler(request, ui)
            if isinstance(result, web.StreamResponse):
                return result
            return render(request, template, {**ui.context(take_notices=not fragment), **result})

        handle.__name__ = handler.__name__
        ROUTES.append(("GET", path, handle))
        return handler

    return register


def form(path: str) -> Callable[[FormHandler], FormHandler]:
    """A POST target for signed-in browsers whose form carries the session's CSRF token."""

    def register(handler: FormHandler) -> FormHandler:
        async def handle(request: web.Request) -> web.StreamResponse:
            ui = signed_in(request)
            data = await request.post()
            offered = data.get("csrf")
            if not ui.session.csrf_matches(offered if isinstance(offered, str) else None):
                reason = "the form carried no CSRF token" if offered is None else "the form's CSRF token is wrong"
                await audit_event(request, ui.subject, "ui_form.submit", request.path, decision="deny",
                                  outcome="denied", reason=reason)
                raise Forbidden(f"{reason}: reload the page and submit it again")
            return await handler(request, ui, data)

        handle.__name__ = handler.__name__
        ROUTES.append(("POST", path, handle))
        return handler

    return register


async def audit_event(request: web.Request, subject: Subject, action: str, resource: str | None, *,
                      decision: str = "allow", outcome: str | None = "ok", reason: str | None = None) -> None:
    """One dashboard event (a sign-in, a refused form) in the audit log; logged if PostgreSQL is away."""
    try:
        async with request.app[DATABASE].connection() as conn:
            await audit.audit(conn, subject, action, "ui", printable(resource) if resource else None,
                              decision=decision, outcome=outcome, reason=reason)
    except DatabaseUnavailable as exc:
        logger.error("could not audit %s %s by %s: %s", decision, action, subject, exc.detail)
