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


# -- pages and actions, by role ------------------------------------------------------------------------

PAGES = ("/ui/", "/ui/models", "/ui/audit", "/ui/policy")


@pytest.fixture
async def staging(db):
    """Imports stay staged (models.import.auto_promote false), so there is something to promote."""
    from modelcache import preferences
    from modelcache.auth import Subject
    await preferences.set_preference(db, "models.import.auto_promote", False, Subject.local())


@pytest.mark.parametrize("role", ["admin", "operator", "reader"])
async def test_every_page_renders_for_every_role(role, staging, browser, make_token, make_artifact, make_file, settings):
    staged = await make_artifact(make_file(prefix=b"GGUF"), model="tiny", version="1")
    failed = settings.import_dir / ".failed"
    failed.mkdir(parents=True)
    (failed / "broken.gguf.error.json").write_text('{"file": "broken.gguf", "reason": "unreadable", '
                                                   '"error": "not a GGUF file", "time": "2026-01-01T00:00:00+00:00"}')
    (settings.import_dir / "arriving.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    b = browser()
    await b.sign_in(await make_token(role, name=f"pat-{role}"))
    for path in PAGES:
        status, text, headers = await b.get(path)
        assert status == 200, (path, text)
        assert f"pat-{role}" in text and headers["Content-Type"].startswith("text/html")
    _, overview, _ = await b.get("/ui/")
    assert "broken.gguf" in overview and "not a GGUF file" in overview and "arriving.gguf" in overview
    assert "Ready: the database answers" in overview
    _, models, _ = await b.get("/ui/models")
    assert str(staged.digest)[:19] in models
    manager = role in ("admin", "operator")
    assert (f"/ui/models/{staged.artifact_id}/promote" in models) is manager
    # the navigation offers the download and audit lists only to the roles that may read them
    assert ('href="/ui/downloads"' in overview) is manager and ('href="/ui/audit"' in overview) is manager
    assert 'href="/ui/nodes"' in overview and 'href="/ui/policy"' in overview
    _, audit_page, _ = await b.get("/ui/audit")
    assert ("needs the admin or operator role" in audit_page) is not manager
    _, policy_page, _ = await b.get("/ui/policy")
    assert ('action="/ui/policy/models.cache.max_bytes"' in policy_page) is (role == "admin")


async def test_an_operator_promotes_through_the_page_and_a_reader_is_refused(staging, browser, make_token, make_artifact,
                                                                              make_file, db, server, http):
    staged = await make_artifact(make_file(prefix=b"GGUF"), model="tiny", version="1")
    reader, operator = browser(), browser()
    await reader.sign_in(await make_token("reader", name="rita"))
    await operator.sign_in(await make_token("operator", name="otto"))

    # the reader forges the confirmed form: refused by the /v1 endpoint's own role check, and audited
    status, text, _ = await reader.post(f"/ui/models/{staged.artifact_id}/promote", {"back": "/ui/models"})
    assert status == 403 and "model_artifact.promote needs role admin or operator" in text
    denied = await audit_rows(db, "model_artifact.promote")
    assert [(r["decision"], r["subject_id"]) for r in denied] == [("deny", "rita")]
    status, text, _ = await reader.get(f"/ui/models/{staged.artifact_id}/promote")
    assert status == 200 and "may not promote" in text and 'id="confirm"' not in text

    status, text, _ = await operator.get(f"/ui/models/{staged.artifact_id}/promote?back=/ui/models")
    assert status == 200 and 'id="confirm"' in text
    status, _, headers = await operator.post(f"/ui/models/{staged.artifact_id}/promote", {"back": "/ui/models"})
    assert status == 303 and headers["Location"] == "/ui/models"
    _, text, _ = await operator.get("/ui/models")
    assert f"Promoted tiny:1 ({staged.digest})" in text
    rows = await audit_rows(db, "model_artifact.promote")
    assert [(r["decision"], r["subject_id"]) for r in rows] == [("deny", "rita"), ("allow", "otto")]
    async with http.get(server.make_url(f"/v1/artifacts/{staged.digest}"),
                        headers=bearer(await make_token("reader"))) as r:
        assert (await r.json())["state"] == "promoted"
    # pull instructions for the promoted artifact, from the one rule (selection.artifact_pull)
    _, text, _ = await operator.get(f"/ui/models/{staged.artifact_id}")
    assert f"/v1/blobs/{staged.digest}" in text and "ollama pull --insecure 127.0.0.1:" in text

    for action in ("pin", "unpin", "verify", "evict"):
        status, _, _ = await operator.post(f"/ui/models/{staged.artifact_id}/{action}", {})
        assert status == 303, action
    _, text, _ = await operator.get("/ui/models?state=evicted")
    assert "Evicted tiny:1" in text and 'data-state="evicted"' in text


async def test_models_filters(browser, make_token, make_artifact, make_file, db):
    from modelcache import preferences
    from modelcache.auth import Subject
    await make_artifact(make_file(gguf=True), model="alpha", version="1")
    await preferences.set_preference(db, "models.import.auto_promote", False, Subject.local())
    await make_artifact(make_file(prefix=b"GGUF"), model="beta", version="2")
    b = browser()
    await b.sign_in(await make_token("reader"))
    _, text, _ = await b.get("/ui/models?q=alp")
    assert "alpha:1" in text and "beta:2" not in text
    _, text, _ = await b.get("/ui/models?state=staged")
    assert "beta:2" in text and "alpha:1" not in text
    _, text, _ = await b.get("/ui/models?type=safetensors")
    assert "No artifacts match these filters" in text


async def test_the_policy_history_is_shown_to_the_roles_that_may_read_it_through_v1(browser, make_token, db):
    from modelcache import preferences
    from modelcache.auth import Subject
    await preferences.set_preference(db, "models.cache.max_bytes", 5000, Subject.local(), reason="a secret reason")
    for role, shown in (("admin", True), ("operator", True), ("reader", False)):
        b = browser()
        await b.sign_in(await make_token(role))
        _, text, _ = await b.get("/ui/policy")
        assert ('id="history"' in text and "a secret reason" in text) is shown, role
        assert "models.cache.max_bytes" in text  # the value itself every role reads


async def test_policy_edit_and_a_stale_edit_is_refused_with_the_current_value(browser, make_token, db):
    first, second = browser(), browser()
    await first.sign_in(await make_token("admin", name="ann"))
    await second.sign_in(await make_token("admin", name="ben"))
    key = "models.cache.max_bytes"
    await second.get("/ui/policy")  # both read version 0
    status, _, _ = await first.post(f"/ui/policy/{key}", {"value": "5000", "expected_version": "0",
                                                          "reason": "small disk"})
    assert status == 303
    _, text, _ = await first.get("/ui/policy")
    assert f"{key} is now 5000 (version 1)" in text and "small disk" in text
    status, text, _ = await second.post(f"/ui/policy/{key}", {"value": "9000", "expected_version": "0"})
    assert status == 409 and "It is now 5000 (version 1, set by token:ann)" in text
    status, text, _ = await second.post(f"/ui/policy/{key}", {"value": "lots", "expected_version": "1"})
    assert status == 400 and "expected a whole number" in text
    rows = await audit_rows(db, "preference.update")
    assert [(r["decision"], r["subject_id"]) for r in rows] == [("allow", "ann")]


async def test_a_forged_policy_edit_by_an_operator_is_refused(browser, make_token, db):
    b = browser()
    await b.sign_in(await make_token("operator", name="olga"))
    _, text, _ = await b.get("/ui/policy")
    assert "<form method=\"post\" action=\"/ui/policy/" not in text
    status, text, _ = await b.post("/ui/policy/models.import.auto_promote", {"value": "false"})
    assert status == 403 and "preference.update needs role admin" in text
    assert [(r["decision"], r["subject_id"]) for r in await audit_rows(db, "preference.update")] == [("deny", "olga")]


async def test_audit_filters_and_pages(browser, make_token):
    b = browser()
    await b.sign_in(await make_token("admin", name="dora"))
    for _ in range(3):
        assert (await browser().sign_in("mc_nope"))[0] == 401
    _, text, _ = await b.get("/ui/audit?action=ui_session.create&decision=deny")
    assert text.count('class="decision-deny"') == 3 and "decision-allow" not in text
    _, text, _ = await b.get("/ui/audit?subject=token:dora")
    assert text.count("<tr class=\"decision-") == 1
    _, text, _ = await b.get("/ui/audit?since=2000-01-01T00:00&until=2000-01-02T00:00")
    assert "No events match" in text
    _, text, _ = await b.get("/ui/audit?decision=maybe")
    assert "query parameter &#39;decision&#39;" in text


async def test_the_cookie_is_secure_behind_an_https_proxy(start_server, make_settings, make_token, http):
    srv = await start_server(make_settings(**{"server.public_url": "https://cache.example"}))
    b = Browser(http, str(srv.make_url("")).rstrip("/"))
    _, _, headers = await b.sign_in(await make_token("reader"))
    assert SimpleCookie(headers["Set-Cookie"])["mc_session"]["secure"]
    await srv.close()


async def test_a_sign_in_posted_from_another_site_is_refused(server, http, make_token, db):
    token = await make_token("admin", name="eve-target")
    base = str(server.make_url("")).rstrip("/")
    async with http.post(f"{base}/ui/signin", data={"token": token}, allow_redirects=False,
                         headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and "Set-Cookie" not in r.headers
    async with http.post(f"{base}/ui/signin", data={"token": token}, allow_redirects=False,
                         headers={"Origin": base}) as r:
        assert r.status == 303
    rows = await audit_rows(db, "ui_session.create")
    assert [(r["decision"], r["reason"]) for r in rows] == [
        ("deny", "posted from another site (https://evil.example)"), ("allow", None)]
