"""The dashboard as an attacker meets it: crafted links, forged forms, sign-in floods.

A real server on loopback over a real PostgreSQL, driven by test_ui's hand-made Browser.
"""

from __future__ import annotations

from http.cookies import SimpleCookie

from test_ui import browser, staging  # noqa: F401 - fixtures


# -- redirect targets a link can carry --------------------------------------------------------------

LINE_BREAK = "\r\nSet-Cookie: mc_session=planted"


async def test_a_sign_in_link_whose_next_holds_a_line_break_signs_in_to_the_overview(browser, make_token, db):
    """``/ui/signin?next=/ui/%0d%0a...`` put the line break in the form's hidden field; posting it made the
    answer's Location header unsendable (aiohttp refuses it and drops the connection): a crafted link broke
    every sign-in made through it, with a session made and audited but never handed over."""
    b = browser()
    status, text, _ = await b.get("/ui/signin?next=/ui/models%0d%0aSet-Cookie:%20mc_session=planted")
    assert status == 200 and 'name="next" value="/ui/"' in text
    for target in ("/ui/models" + LINE_BREAK, "/ui/models\tx", "/ui/models\x00", "/ui/ models"):
        status, _, headers = await b.post("/ui/signin", {"token": await make_token("reader"), "next": target},
                                          csrf=False)
        assert status == 303 and headers["Location"] == "/ui/", repr(target)
        assert list(SimpleCookie(headers["Set-Cookie"])) == ["mc_session"]
    # a plain path of ours is still where the browser goes back to
    status, _, headers = await b.post("/ui/signin", {"token": await make_token("reader"),
                                                     "next": "/ui/models?state=staged&q=a%20b"}, csrf=False)
    assert status == 303 and headers["Location"] == "/ui/models?state=staged&q=a%20b"


async def test_a_confirm_link_whose_back_holds_a_line_break_goes_back_to_the_models(staging, browser, make_token,
                                                                                   make_artifact, make_file):
    """The same through a model action: the action ran, then its answer could not be sent."""
    staged = await make_artifact(make_file(prefix=b"GGUF"), model="tiny", version="1")
    b = browser()
    await b.sign_in(await make_token("operator"))
    status, text, _ = await b.get(f"/ui/models/{staged.artifact_id}/pin?back=/ui/models%0d%0aX:%20y")
    assert status == 200 and 'name="back" value="/ui/models"' in text
    status, _, headers = await b.post(f"/ui/models/{staged.artifact_id}/pin", {"back": "/ui/models" + LINE_BREAK})
    assert status == 303 and headers["Location"] == "/ui/models"
    status, _, headers = await b.post(f"/ui/models/{staged.artifact_id}/unpin", {"back": "/ui/models?state=staged"})
    assert status == 303 and headers["Location"] == "/ui/models?state=staged"


# -- the session table -------------------------------------------------------------------------------

async def test_one_token_signing_in_again_and_again_signs_no_one_else_out(browser, make_token, monkeypatch):
    """Sessions are kept up to a bound, the oldest going first; a reader's token signed in that many times
    (a loop of POSTs, seconds at the real bound) pushed every other person's session out. Now a token's
    own oldest session goes once it holds PER_TOKEN."""
    from modelcache.server.ui import session
    monkeypatch.setattr(session, "_KEPT", 3 * session.PER_TOKEN)
    admin = browser()
    await admin.sign_in(await make_token("admin", name="ada"))
    flooder = await make_token("reader", name="flood")
    first = browser()
    await first.sign_in(flooder)
    for _ in range(4 * session.PER_TOKEN):
        status, _, _ = await browser().sign_in(flooder)
        assert status == 303
    status, text, _ = await admin.get("/ui/")
    assert status == 200 and "ada" in text
    assert (await first.get("/ui/"))[0] == 303  # the flooder's own oldest session went instead
