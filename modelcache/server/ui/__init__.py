"""The dashboard under ``/ui/``: server-rendered pages over the same ``/v1`` code paths as the API.

- ``session.py``: sign-in (a token exchanged for a session cookie), sessions in memory, sign-out;
- ``pages.py``: ``@page`` and ``@form``, the two ways to write a page handler (session, CSRF,
  ``ui.invoke`` of a ``/v1`` endpoint), and the security headers every page carries;
- one module per page (``overview.py``, ``models.py``, ``audit.py``, ``policy.py``, ...), each
  registering its routes with ``@page`` / ``@form`` when imported below;
- ``templates/`` (jinja2, autoescaped; ``base.html`` holds the navigation) and ``static/``
  (our own CSS and plain JavaScript; pages read fine without the script).

Errors under ``/ui`` are answered as an HTML page by the one error middleware (``errors.mount``).
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from ...auth import Role, Subject, secret_sha256
from ...errors import Forbidden, ModelcacheError
from .. import errors
from ..keys import CATALOG, SETTINGS
from . import session as sessions
from .pages import ROUTES, audit_event, form, local_target, render, sections, see_other, signed_in
from . import filters, traffic
from . import overview, models, downloads, nodes, audit, policy  # noqa: F401 - each registers its routes

HERE = Path(__file__).parent


def setup(app: web.Application) -> None:
    """Mount the dashboard on ``app``: templates, static files, sessions, routes, the HTML error page."""
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader(__name__, "templates"),
                               autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined)
    filters.install(env)
    app[sessions.SESSIONS] = sessions.Sessions()
    app[traffic.SERVED] = traffic.ServedRing()
    app.cleanup_ctx.append(traffic.ring_ctx)
    app.router.add_get("/", to_dashboard)
    app.router.add_get("/ui", to_dashboard)
    app.router.add_get("/ui/signin", signin_page)
    app.router.add_post("/ui/signin", signin)
    app.router.add_static("/ui/static", HERE / "static", append_version=False)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    errors.mount(app, "/ui", errors.Renderer(error_page))


async def to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def _next(value: str | None) -> str:
    """Where to go after signing in: a path of ours (see local_target), else the overview."""
    return local_target(value, "/ui/", "/ui/")


async def signin_page(request: web.Request) -> web.StreamResponse:
    if sessions.current(request) is not None:
        raise web.HTTPSeeOther(_next(request.query.get("next")))
    return render(request, "signin.html", {"next": _next(request.query.get("next")), "error": None})


async def signin(request: web.Request) -> web.StreamResponse:
    """Exchange a token for a session. The token is hashed at once and never kept.

    The one form posted without a session, so without a CSRF token: a browser says where the form
    came from (``Origin``), and one from another site is refused, so no page elsewhere can sign a
    visitor in under a token of its choosing."""
    origin = request.headers.get("Origin")
    if origin is not None and origin not in _own_origins(request):
        await audit_event(request, Subject("anonymous", request.remote), "ui_session.create", "/ui/signin",
                          decision="deny", outcome="denied", reason=f"posted from another site ({origin})")
        raise Forbidden(f"a sign-in posted from {origin}, not from this server's own page, is refused")
    data = await request.post()
    token, target = data.get("token"), _next(data.get("next") if isinstance(data.get("next"), str) else None)
    entry = request.app[CATALOG].token(secret_sha256(token.strip())) if isinstance(token, str) and token else None
    now = sessions.now()
    reason = None
    if entry is None:
        reason = "unknown or revoked token"
    elif entry.expired(now):
        reason = f"token {entry.name} expired at {entry.expires_at.isoformat()}"
    elif entry.role is Role.NODE:
        reason = f"token {entry.name} is a node's token: nodes cannot sign in to the dashboard"
    if reason is not None:
        who = Subject("token", entry.name, entry.role) if entry is not None else Subject("anonymous", request.remote)
        await audit_event(request, who, "ui_session.create", "/ui/signin", decision="deny", outcome="denied",
                          reason=reason)
        return render(request, "signin.html", {"next": target, "error": reason}, status=401)
    session = request.app[sessions.SESSIONS].create(secret_sha256(token.strip()), entry.expires_at, now)
    subject = Subject("token", entry.name, entry.role)
    await audit_event(request, subject, "ui_session.create", "/ui/signin")
    response = see_other(target)
    sessions.set_cookie(response, request, session)
    return response


@form("/ui/signout")
async def signout(request: web.Request, ui, data) -> web.StreamResponse:
    request.app[sessions.SESSIONS].end(ui.session.id)
    await audit_event(request, ui.subject, "ui_session.delete", "/ui/signout")
    response = see_other("/ui/signin")
    sessions.clear_cookie(response, request)
    return response


def _own_origins(request: web.Request) -> set[str]:
    own = {f"{request.scheme}://{request.host}"}
    configured = request.app[SETTINGS].server.public_url
    if configured:
        scheme, _, rest = configured.partition("://")
        own.add(f"{scheme}://{rest.split('/', 1)[0]}")
    return own


def error_page(request: web.Request, exc: ModelcacheError) -> web.Response:
    """An error under /ui as a page a person reads (the API's problem+json is for programs)."""
    found = sessions.current(request)
    context = {"status": exc.status, "title": exc.title, "detail": exc.detail}
    if found is not None:
        context.update(subject=found[1], role=found[1].role.value, csrf=found[0].csrf, sections=sections(found[1]),
                       path=request.path)
    return render(request, "error.html", context, status=exc.status)


__all__ = ["setup", "signed_in"]
