"""Live parts of pages: ``@fragment`` routes answer one part of a page, rendered by the page's own
template, for ``static/live.js`` to fetch about once a second while the tab is visible.

A fragment is a page in every respect (a signed-in session, the same ``ui.invoke`` reads, the same
security headers) except that it leaves the session's notices for the next whole page: live.js polls
while a form's redirect is on its way, and must not swallow what that form has to say.
"""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from .pages import ROUTES, PageHandler, render, signed_in


def fragment(path: str, template: str) -> Callable[[PageHandler], PageHandler]:
    """A GET route answering ``template`` (one element, with the ``id`` of the part it replaces)."""

    def register(handler: PageHandler) -> PageHandler:
        async def handle(request: web.Request) -> web.StreamResponse:
            ui = signed_in(request)
            result = await handler(request, ui)
            if isinstance(result, web.StreamResponse):
                return result
            context: dict[str, Any] = {"subject": ui.subject, "role": ui.subject.role.value,
                                       "csrf": ui.session.csrf, "path": request.path, "may": ui.may}
            return render(request, template, {**context, **result})

        handle.__name__ = handler.__name__
        ROUTES.append(("GET", path, handle))
        return handler

    return register
