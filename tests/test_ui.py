"""The dashboard over real HTTP: sign-in, cookies, sessions ending with their token, CSRF, roles, pages.

A real server on loopback over a real PostgreSQL; the browser's part is done by hand here (cookies
and forms), and by a real chromium in test_ui_browser.py.
"""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import pytest

from modelcache.server.keys import CATALOG


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


class Browser:
    """Just enough of a browser: one session cookie, no redirects followed, the CSRF field read from pages."""

    def __init__(self, http, base: str) -> None:
        self.http, self.base = http, base
        self.cookie: str | None = None
        self.csrf: str | None = None

    def _headers(self) -> dict:
        return {"Cookie": f"mc_session={self.cookie}"} if self.cookie else {}

    async def get(self, path: str) -> tuple[int, str, dict]:
        async with self.http.get(self.base + path, headers=self._headers(), allow_redirects=False) as r:
            text = await r.text()
            found = re.search(r'name="csrf" value="([^"]+)"', text)
            if found:
                self.csrf = found.group(1)
            return r.status, text, r.headers

    async def post(self, path: str, data: dict, csrf: bool = True) -> tuple[int, str, dict]:
        form = {**data, **({"csrf": self.csrf} if csrf and self.csrf else {})}
        async with self.http.post(self.base + path, data=form, headers=self._headers(),
                                  allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def sign_in(self, token: str) -> tuple[int, str, dict]:
        status, text, headers = await self.post("/ui/signin", {"token": token, "next": "/ui/"}, csrf=False)
        if status == 303:
            cookie = SimpleCookie(headers["Set-Cookie"])
            self.cookie = cookie["mc_session"].value
            await self.get("/ui/")
        return status, text, headers


@pytest.fixture
def browser(server, http):
    def make() -> Browser:
        return Browser(http, str(server.make_url("")).rstrip("/"))
    return make


async def audit_rows(db, action: str) -> list[dict]:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT * FROM model_audit_log WHERE action = %s ORDER BY created_at", (action,))
        return await cur.fetchall()


async def test_root_and_pages_send_a_stranger_to_sign_in(browser):
    b = browser()
    status, _, headers = await b.get("/")
    assert status == 302 and headers["Location"] == "/ui/"
    status, _, headers = await b.get("/ui/?state=staged")
    assert status == 303 and headers["Location"] == "/ui/signin?next=/ui/?state%3Dstaged"
    status, text, headers = await b.get("/ui/signin")
    assert status == 200 and 'name="token"' in text
    assert "default-src 'self'" in headers["Content-Security-Policy"]


async def test_sign_in_sets_a_strict_cookie_and_is_audited(browser, make_token, db):
    admin = await make_token("admin", name="alice")
    b = browser()
    status, text, headers = await b.sign_in("mc_wrong")
    assert status == 401 and "unknown or revoked token" in text and "Set-Cookie" not in headers
    status, _, headers = await b.sign_in(admin)
    assert status == 303 and headers["Location"] == "/ui/"
    cookie = SimpleCookie(headers["Set-Cookie"])["mc_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui"
    assert not cookie["secure"]  # plain HTTP here; over TLS it is Secure
    assert 0 < int(cookie["max-age"]) <= 8 * 3600
    assert admin not in headers["Set-Cookie"]
    status, text, _ = await b.get("/ui/")
    assert status == 200 and "alice" in text and admin not in text
    rows = await audit_rows(db, "ui_session.create")
    assert [(r["decision"], r["subject_id"]) for r in rows] == [("deny", "127.0.0.1"), ("allow", "alice")]
    assert rows[0]["reason"] == "unknown or revoked token"

    status, _, headers = await b.post("/ui/signout", {})
    assert status == 303 and headers["Location"] == "/ui/signin"
    assert [r["subject_id"] for r in await audit_rows(db, "ui_session.delete")] == ["alice"]
    status, _, _ = await b.get("/ui/")
    assert status == 303  # the old cookie names no session any more


async def test_a_session_expires_with_its_token(browser, make_token):
    import datetime as dt
    token = await make_token("reader", expires_in=dt.timedelta(minutes=30))
    b = browser()
    _, _, headers = await b.sign_in(token)
    assert 1700 < int(SimpleCookie(headers["Set-Cookie"])["mc_session"]["max-age"]) <= 1800


async def test_a_session_ends_when_its_token_is_revoked(browser, make_token, server, http):
    admin = await make_token("admin", name="root")
    operator = await make_token("operator", name="bob")
    b = browser()
    await b.sign_in(operator)
    assert (await b.get("/ui/"))[0] == 200
    async with http.delete(server.make_url("/v1/tokens/bob"), headers=bearer(admin)) as r:
        assert r.status == 200
    await server.app[CATALOG].tokens_changed()  # what the token NOTIFY does within moments
    status, _, headers = await b.get("/ui/")
    assert status == 303 and headers["Location"].startswith("/ui/signin")


async def test_a_node_token_cannot_sign_in(browser, make_token, db):
    token = await make_token("node", name="gpu1")
    status, text, _ = await browser().sign_in(token)
    assert status == 401 and "node" in text
    assert [r["decision"] for r in await audit_rows(db, "ui_session.create")] == ["deny"]


async def test_a_form_without_its_csrf_token_is_refused_and_audited(browser, make_token, db):
    b = browser()
    await b.sign_in(await make_token("admin", name="carol"))
    status, text, headers = await b.post("/ui/signout", {}, csrf=False)
    assert status == 403 and "CSRF" in text and headers["Content-Type"].startswith("text/html")
    status, text, _ = await b.post("/ui/signout", {"csrf": "forged"}, csrf=False)
    assert status == 403
    rows = await audit_rows(db, "ui_form.submit")
    assert [(r["decision"], r["subject_id"], r["resource"]) for r in rows] == [("deny", "carol", "/ui/signout")] * 2
    assert [r["reason"] for r in rows] == ["the form carried no CSRF token", "the form's CSRF token is wrong"]
    assert (await b.get("/ui/"))[0] == 200  # still signed in: nothing happened


async def test_every_post_under_ui_checks_csrf(server):
    from modelcache.server.ui.pages import ROUTES
    forms = {path for method, path, _ in ROUTES if method == "POST"}
    posts = {r.resource.canonical for r in server.app.router.routes()
             if r.method == "POST" and r.resource.canonical.startswith("/ui")}
    assert posts - forms == {"/ui/signin"}  # the one form posted before there is a session
