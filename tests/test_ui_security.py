"""The dashboard as an attacker meets it: crafted links, forged forms, sign-in floods.

A real server on loopback over a real PostgreSQL, driven by test_ui's hand-made Browser.
"""

from __future__ import annotations

import asyncio
import errno
import os
from http.cookies import SimpleCookie
from pathlib import Path

from test_ui import audit_rows, browser, staging  # noqa: F401 - fixtures


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


# -- forged forms --------------------------------------------------------------------------------------

async def test_a_forged_policy_edit_is_refused_for_the_role_before_its_value_is_read(browser, make_token, db):
    """The page parsed the posted value (and key) before /v1 checked the role: an operator's or reader's
    forged edit with a bad value was answered 400 "expected a whole number" and left no trace in the
    audit log. The role comes first: 403, audited, whatever the form holds."""
    for role in ("operator", "reader"):
        b = browser()
        await b.sign_in(await make_token(role, name=f"mallory-{role}"))
        for key, value in (("models.cache.max_bytes", "lots"), ("models.cache.max_bytes", "1"),
                           ("no.such.key", "1")):
            status, text, _ = await b.post(f"/ui/policy/{key}", {"value": value, "expected_version": "0"})
            assert status == 403 and "preference.update needs role admin" in text, (role, key, value)
    rows = await audit_rows(db, "preference.update")
    assert [(r["decision"], r["subject_id"]) for r in rows] == \
        [("deny", "mallory-operator")] * 3 + [("deny", "mallory-reader")] * 3
    # an admin's bad value is still told as such, on the page
    admin = browser()
    await admin.sign_in(await make_token("admin"))
    status, text, _ = await admin.post("/ui/policy/models.cache.max_bytes", {"value": "lots", "expected_version": "0"})
    assert status == 400 and "expected a whole number" in text


# -- what the overview reads from the import folder -----------------------------------------------------

def release_fifo(path: Path) -> None:
    """Let a reader blocked opening the FIFO at ``path`` go (it reads an end of file)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # no reader waiting: nothing to release
            raise


async def get_beside_a_fifo(b, path: str, fifo: Path) -> tuple[int, str, dict]:
    """``b.get(path)`` within 10 s; if it waits on ``fifo`` longer, the server is let go (every open of the
    FIFO for two seconds reads an end of file) before the timeout is raised, so the test ends."""
    try:
        return await asyncio.wait_for(b.get(path), 10)
    except TimeoutError:
        for _ in range(40):
            release_fifo(fifo)
            await asyncio.sleep(0.05)
        raise


async def test_the_overview_follows_no_link_and_waits_on_no_fifo_in_failed(browser, make_token, settings, tmp_path):
    """Whoever may drop files into the import folder (an NFS mount, a shared folder) may not make the
    overview show a file elsewhere: the importer refuses links, but the failed-imports list read every
    ``.failed/*.error.json`` through links (a JSON credentials file showed its fields to every reader)
    and opened a FIFO so named, leaving the page and a worker thread waiting for ever."""
    secret = tmp_path / "elsewhere" / "service-account.json"
    secret.parent.mkdir()
    secret.write_text('{"file": "x", "reason": "private_key_id", "error": "SECRET-4d1f"}')
    failed = settings.import_dir / ".failed"
    failed.mkdir(parents=True)
    (failed / "leak.gguf.error.json").symlink_to(secret)
    b = browser()
    await b.sign_in(await make_token("reader"))  # which reads the overview
    fifo = failed / "stuck.gguf.error.json"
    os.mkfifo(fifo)
    status, text, _ = await get_beside_a_fifo(b, "/ui/", fifo)
    assert status == 200
    assert "SECRET-4d1f" not in text and "private_key_id" not in text
    assert "leak.gguf" in text and "a symbolic link" in text
    assert "stuck.gguf" in text and "not a regular file" in text


async def test_the_overview_lists_nothing_through_a_failed_folder_that_is_a_link(browser, make_token, settings,
                                                                                  tmp_path):
    """``.failed`` itself a link to another folder: its ``*.error.json`` files were listed (and the whole
    tree under it walked on every view, ``/`` included)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vault.error.json").write_text('{"file": "x", "reason": "token", "error": "SECRET-77aa"}')
    settings.import_dir.mkdir(parents=True)
    (settings.import_dir / ".failed").symlink_to(elsewhere, target_is_directory=True)
    b = browser()
    await b.sign_in(await make_token("reader"))
    status, text, _ = await b.get("/ui/")
    assert status == 200 and "SECRET-77aa" not in text and "vault" not in text
    assert ".failed is a symbolic link" in text


async def test_a_reason_file_without_the_expected_fields_does_not_take_the_overview_down(browser, make_token,
                                                                                         settings):
    """A reason file is anyone's JSON (see above): one without ``time`` or ``reason`` made the overview's
    template fail, a 500 for every role until the file was removed."""
    failed = settings.import_dir / ".failed"
    failed.mkdir(parents=True)
    (failed / "empty.gguf.error.json").write_text("{}")
    (failed / "odd.gguf.error.json").write_text('{"reason": ["a", "list"], "time": 7, "error": {"x": 1}}')
    b = browser()
    await b.sign_in(await make_token("reader"))
    status, text, _ = await b.get("/ui/")
    assert status == 200, text
    assert "empty.gguf" in text and "odd.gguf" in text


async def test_a_fifo_named_modelcache_json_holds_up_neither_the_overview_nor_the_scan(browser, make_token,
                                                                                       settings):
    """The import folder's scan (the overview runs it on every view, syncd on every pass) opened a folder's
    modelcache.json without asking what it is: a FIFO so named kept it waiting for ever."""
    folder = settings.import_dir / "mine" / "1"
    folder.mkdir(parents=True)
    (folder / "weights.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    b = browser()
    await b.sign_in(await make_token("reader"))
    fifo = folder / "modelcache.json"
    os.mkfifo(fifo)
    status, text, _ = await get_beside_a_fifo(b, "/ui/", fifo)
    assert status == 200 and "mine/1" in text
