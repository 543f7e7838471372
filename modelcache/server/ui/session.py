"""Dashboard sessions: a modelcache token exchanged for a cookie, kept on the server, checked on every request.

Signing in posts a token once (``POST /ui/signin``). The server keeps, under a
random session id, only the token's sha256, a CSRF secret and an expiry; the
browser keeps only the id, in a cookie that is ``HttpOnly``, ``SameSite=Strict``,
``Secure`` when the browser came over TLS (to us, or to the proxy ``server.public_url``
names), and expires with the session. The
token itself is never put in a page, in JavaScript or in browser storage.

Every request resolves the session's token again through the catalog, the same
in-memory lookup ``server/auth.py`` makes for a Bearer token, so a revoked or
expired token ends its sessions at once.

Sessions live in this process's memory: a restart signs everyone out, and with
several server processes behind one address a browser must stick to one. That
is the price of keeping no session table; sessions are short (``LIFETIME``).
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass, field

from aiohttp import web

from ...auth import Role, Subject
from ..keys import CATALOG, SETTINGS

COOKIE = "mc_session"
LIFETIME = dt.timedelta(hours=8)  # never beyond the token's own expiry
# Sessions at most, and of one token at most; the oldest go first. Without the second, one token signed in
# _KEPT times (any role may sign in) would push everyone else's session out; now it churns its own, and
# only _KEPT / PER_TOKEN tokens together could do that.
_KEPT = 10_000
PER_TOKEN = 16


@dataclass(slots=True)
class Session:
    id: str
    token_sha256: str
    csrf: str  # the per-session secret every state-changing form carries
    expires_at: dt.datetime
    notices: list[str] = field(default_factory=list)  # what the last action did, shown on the next page

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    """Session id → Session, in memory."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def create(self, token_sha256: str, token_expires_at: dt.datetime | None, now: dt.datetime) -> Session:
        expires = now + LIFETIME
        if token_expires_at is not None:
            expires = min(expires, token_expires_at)
        self._prune(now)
        own = [sid for sid, s in self._by_id.items() if s.token_sha256 == token_sha256]
        if len(own) >= PER_TOKEN:
            del self._by_id[own[0]]
        elif len(self._by_id) >= _KEPT:
            del self._by_id[next(iter(self._by_id))]
        session = Session(secrets.token_urlsafe(32), token_sha256, secrets.token_urlsafe(32), expires)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None, now: dt.datetime) -> Session | None:
        session = self._by_id.get(session_id) if session_id else None
        if session is not None and session.expires_at <= now:
            del self._by_id[session.id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _prune(self, now: dt.datetime) -> None:
        for sid in [sid for sid, s in self._by_id.items() if s.expires_at <= now]:
            del self._by_id[sid]


SESSIONS = web.AppKey("ui_sessions", Sessions)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def current(request: web.Request) -> tuple[Session, Subject] | None:
    """The request's session and its subject, or None: no cookie, unknown or expired session, or a token
    that was revoked or has expired since (then the session ends here too)."""
    sessions = request.app[SESSIONS]
    at = now()
    session = sessions.get(request.cookies.get(COOKIE), at)
    if session is None:
        return None
    entry = request.app[CATALOG].token(session.token_sha256)
    if entry is None or entry.expired(at) or entry.role is Role.NODE:
        sessions.end(session.id)
        return None
    return session, Subject("token", entry.name, entry.role, entry.node_id)


def over_tls(request: web.Request) -> bool:
    """Whether the browser reached us over TLS: this connection is TLS, or ``server.public_url`` is https
    (a proxy in front terminates TLS and talks plain HTTP to us)."""
    return request.secure or request.app[SETTINGS].server.public_url.startswith("https://")


def set_cookie(response: web.StreamResponse, request: web.Request, session: Session) -> None:
    seconds = max(0, int((session.expires_at - now()).total_seconds()))
    response.set_cookie(COOKIE, session.id, path="/ui", max_age=seconds, httponly=True, samesite="Strict",
                        secure=over_tls(request))


def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(COOKIE, path="/ui", httponly=True, samesite="Strict", secure=over_tls(request))
