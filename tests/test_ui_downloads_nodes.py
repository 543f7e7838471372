"""The Downloads and Nodes pages over real HTTP: what each role is offered, forged and CSRF-less posts
refused and audited, every action landing in the /v1 endpoint's own rules, the live fragments.

A real server on loopback over a real PostgreSQL, a hand-driven browser (test_ui.Browser); the live
parts in a real chromium are in test_ui_live_browser.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from test_downloads import allow, audit_rows, bearer, make_download_settings, request_download  # noqa: F401 - a fixture
from test_ui import Browser

pytestmark = pytest.mark.registry


@pytest.fixture
async def cache(make_download_settings, start_server, db, http):
    """A server with sources a (allowed), b (configured, not allowed) and c (allowed by URL prefix); downloads
    wait for approval. Nothing listens at the sources: these tests never start a transfer."""
    settings = make_download_settings({"a": "http://127.0.0.1:9/a/", "b": "http://127.0.0.1:9/b/",
                                       "c": "http://127.0.0.2:9/c/"})
    await allow(db, "a", "http://127.0.0.2:9/", approval=True)
    return await start_server(settings)


def browser_for(server, http) -> Browser:
    return Browser(http, str(server.make_url("")).rstrip("/"))


async def state_of(http, server, token, download_id) -> dict:
    async with http.get(server.make_url(f"/v1/downloads/{download_id}"), headers=bearer(token)) as r:
        return await r.json()


async def test_a_reader_forging_an_approve_is_refused_and_audited(cache, http, make_token, dsn):
    operator, reader = await make_token("operator", "op"), await make_token("reader", "rita")
    asked = await request_download(http, cache, operator, source="a", reference="m.gguf", model="m", version="1")
    b = browser_for(cache, http)
    await b.sign_in(reader)
    status, text, _ = await b.get("/ui/downloads")
    assert status == 403 and "model_download.list needs role admin or operator" in text
    status, text, _ = await b.post(f"/ui/downloads/{asked['id']}/approve", {})  # with the session's CSRF token
    assert status == 403 and "model_download.approve needs role admin" in text
    status, text, _ = await b.post(f"/ui/downloads/{asked['id']}/reject", {"reason": "no"})
    assert status == 403
    denied = [r for r in audit_rows(dsn, "model_download.approve")]
    assert [(d, o) for d, o, _, _ in denied] == [("deny", "denied")] and "reader" in denied[0][2]
    assert [r[0] for r in audit_rows(dsn, "model_download.reject")] == ["deny"]
    assert (await state_of(http, cache, operator, asked["id"]))["state"] == "pending_approval"


async def test_an_action_without_its_csrf_token_is_refused_and_changes_nothing(cache, http, make_token, dsn):
    operator, admin = await make_token("operator", "op"), await make_token("admin", "ada")
    asked = await request_download(http, cache, operator, source="a", reference="m.gguf", model="m", version="1")
    b = browser_for(cache, http)
    await b.sign_in(admin)
    for action, form in (("approve", {}), ("reject", {"reason": "no"}), ("cancel", {})):
        status, text, _ = await b.post(f"/ui/downloads/{asked['id']}/{action}", form, csrf=False)
        assert status == 403 and "CSRF" in text
    status, _, _ = await b.post("/ui/downloads/new", {"source": "a", "reference": "x.gguf", "model": "x",
                                                     "version": "1"}, csrf=False)
    assert status == 403
    assert [(r[0], r[2]) for r in audit_rows(dsn, "ui_form.submit")] == [
        ("deny", "the form carried no CSRF token")] * 4
    assert audit_rows(dsn, "model_download.approve") == []
    assert (await state_of(http, cache, operator, asked["id"]))["state"] == "pending_approval"
    # with it, the same form approves, through the v1 endpoint (its audit event, its answer)
    status, _, headers = await b.post(f"/ui/downloads/{asked['id']}/approve", {})
    assert status == 303 and headers["Location"] == f"/ui/downloads#dl-{asked['id']}"
    status, text, _ = await b.get("/ui/downloads")
    assert f"Download {asked['id']} (m:1) approved: queued." in text
    done = await state_of(http, cache, operator, asked["id"])
    assert done["state"] == "queued" and done["approved_by"] == "token:ada"
    assert [r[0] for r in audit_rows(dsn, "model_download.approve")] == ["allow"]


async def test_each_role_is_offered_what_it_may_do_and_the_v1_rules_speak_on_the_page(cache, http, make_token, dsn):
    operator, admin, admin2 = (await make_token("operator", "op"), await make_token("admin", "ada"),
                               await make_token("admin", "bea"))
    ops, ada = browser_for(cache, http), browser_for(cache, http)
    await ops.sign_in(operator)
    await ada.sign_in(admin)

    # the new-download form offers the configured sources the policy allows, and only those
    status, text, _ = await ops.get("/ui/downloads")
    assert status == 200
    assert re.findall(r'<option value="([^"]*)"[^>]*>[^<]*\(http,', text) == ["a", "c"]
    status, _, headers = await ops.post("/ui/downloads/new", {"source": "a", "reference": "m.gguf", "model": "m",
                                                             "version": "1", "vendor": "", "sha256": ""})
    assert status == 303
    status, text, _ = await ops.post("/ui/downloads/new", {"source": "b", "reference": "m.gguf", "model": "m",
                                                          "version": "2"})  # forged: b is not offered
    assert status == 403 and "models.download.allowed_sources" in text and 'value="m.gguf"' in text
    status, text, _ = await ops.post("/ui/downloads/new", {"source": "a", "reference": "m.gguf", "model": "bad name",
                                                          "version": "2"})
    assert status == 422 and "field &#39;model&#39;" in text

    listed = (await (await http.get(cache.make_url("/v1/downloads"), headers=bearer(admin))).json())["downloads"]
    assert len(listed) == 1 and listed[0]["requested_by"] == "token:op"
    did = listed[0]["id"]
    status, text, _ = await ops.get("/ui/downloads")
    assert f'/ui/downloads/{did}/cancel"' in text  # an operator cancels
    assert "/approve" not in text and "/reject" not in text  # but neither approves nor rejects
    status, text, _ = await ada.get("/ui/downloads?state=pending_approval")
    assert f'/ui/downloads/{did}/approve"' in text and f'/ui/downloads/{did}/reject"' in text

    # the requester may not approve their own: the v1 endpoint's refusal, on the page
    mine = await request_download(http, cache, admin, source="a", reference="n.gguf", model="n", version="1")
    status, text, _ = await ada.post(f"/ui/downloads/{mine['id']}/approve", {"back": "state=pending_approval"})
    assert status == 403 and "may not approve it too; another admin must" in text
    assert f'/ui/downloads/{mine["id"]}/reject"' in text  # still the list, with its filter
    # reject with a reason, by another admin
    bea = browser_for(cache, http)
    await bea.sign_in(admin2)
    status, _, headers = await bea.post(f"/ui/downloads/{mine['id']}/reject", {"reason": "use the Q5 file"})
    assert status == 303
    rejected = await state_of(http, cache, admin, mine["id"])
    assert (rejected["state"], rejected["reason"], rejected["decided_by"]) == ("rejected", "use the Q5 file",
                                                                               "token:bea")
    status, text, _ = await ada.get("/ui/downloads?state=rejected")
    assert "use the Q5 file" in text and did not in text
    status, text, _ = await ada.get("/ui/downloads?source=c")
    assert did not in text and mine["id"] not in text and '<option value="c" selected>c</option>' in text
    status, text, _ = await bea.post(f"/ui/downloads/{mine['id']}/approve", {})
    assert status == 409 and "only a download that is pending_approval can be approved" in text
    status, text, _ = await ops.post(f"/ui/downloads/{did}/cancel", {})
    assert status == 303 and (await state_of(http, cache, admin, did))["state"] == "cancelled"


async def test_the_list_pages_by_state(cache, http, make_token, monkeypatch):
    from modelcache.server.ui import downloads
    monkeypatch.setattr(downloads, "PAGE_SIZE", 1)
    operator, admin = await make_token("operator", "op"), await make_token("admin", "ada")
    older = await request_download(http, cache, operator, source="a", reference="m.gguf", model="m", version="1")
    newer = await request_download(http, cache, operator, source="a", reference="n.gguf", model="n", version="1")
    b = browser_for(cache, http)
    await b.sign_in(admin)
    status, text, _ = await b.get("/ui/downloads?state=pending_approval")
    assert newer["id"] in text and older["id"] not in text and "First page" not in text
    next_page = re.search(r'<a href="(/ui/downloads\?[^"]+)" rel="next">', text).group(1).replace("&amp;", "&")
    assert "state=pending_approval" in next_page and "cursor=" in next_page
    status, text, _ = await b.get(next_page)
    assert older["id"] in text and newer["id"] not in text
    assert '<a href="/ui/downloads?state=pending_approval">First page</a>' in text
    assert f'data-live="/ui/downloads/rows?{next_page.partition("?")[2]}"'.replace("&", "&amp;") in text


async def test_the_rows_fragment_is_the_pages_table_body(cache, http, make_token):
    operator, admin = await make_token("operator", "op"), await make_token("admin", "ada")
    first = await request_download(http, cache, operator, source="a", reference="m.gguf", model="m", version="1")
    b = browser_for(cache, http)
    await b.sign_in(admin)
    status, text, headers = await b.get("/ui/downloads/rows?state=pending_approval")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert text.lstrip().startswith('<tbody id="download-rows" data-live="/ui/downloads/rows?state=pending_approval"')
    assert f'data-key="{first["id"]}"' in text and "<html" not in text
    status, text, _ = await b.get("/ui/downloads/rows?state=completed")
    assert first["id"] not in text
    status, text, _ = await browser_for(cache, http).get("/ui/downloads/rows")
    assert status == 303  # no session: sent to sign in (live.js stops)


@pytest.fixture
def node_cache(make_settings, start_server):
    async def start(**nodes_settings):
        return await start_server(make_settings(**{f"nodes.{k}": str(v) for k, v in nodes_settings.items()}))
    return start


async def test_the_nodes_page_shows_reports_stale_and_failed_nodes_and_load_requests(
        node_cache, http, make_token, make_file, make_artifact):
    server = await node_cache(heartbeat_timeout=2)
    admin, reader = await make_token("admin", "ada"), await make_token("reader", "rita")
    one = await make_artifact(make_file(gguf=True, size=4096), model="llama3", version="8b", vendor="meta")
    two = await make_artifact(make_file(gguf=True, size=4096), model="qwen", version="1b")

    async def api(method, path, token=admin, **kw):
        async with http.request(method, server.make_url(path), headers=bearer(token), **kw) as r:
            return r.status, await r.json()

    versions = [(await api("GET", f"/v1/artifacts/{a.artifact_id}"))[1]["model_version_id"] for a in (one, two)]
    nodes = {}
    for name in ("gpu-1", "gpu-2"):
        status, body = await api("POST", "/v1/nodes", json={"name": name, "facts": {"runtimes": ["files"]}})
        nodes[name] = (body["node"]["id"], body["config"]["token"])
    gpu1, gpu2 = nodes["gpu-1"], nodes["gpu-2"]
    status, _ = await api("POST", f"/v1/nodes/{gpu1[0]}/availability", token=gpu1[1],
                          json={"model_version_id": versions[0], "status": "available"})
    assert status == 200
    status, _ = await api("POST", f"/v1/nodes/{gpu2[0]}/availability", token=gpu2[1],
                          json={"model_version_id": versions[0], "status": "failed",
                                "details": {"error": "disk full"}})
    status, load = await api("POST", f"/v1/nodes/{gpu1[0]}/loads", json={"model_version_id": versions[1]})
    assert status == 201

    b = browser_for(server, http)
    await b.sign_in(reader)  # a reader sees the nodes
    status, text, _ = await b.get("/ui/nodes")
    assert status == 200
    assert re.search(rf'id="cell-{gpu1[0]}-{versions[0]}" data-status="available"', text)
    assert re.search(rf'id="cell-{gpu2[0]}-{versions[0]}" data-status="failed"', text) and "disk full" in text
    assert re.search(rf'id="cell-{gpu1[0]}-{versions[1]}" data-status="none"', text)
    assert "meta/llama3:8b" in text and "qwen:1b" in text and "load pending" in text
    assert re.search(rf'id="node-{gpu2[0]}" class="node node-ready node-failed"', text)
    assert f'id="load-{load["id"]}" class="load-pending"' in text
    status, text, _ = await b.get("/ui/nodes/live")
    assert status == 200 and text.lstrip().startswith('<div id="nodes-live"') and "<html" not in text
    # silent past nodes.heartbeat_timeout: stale, and so highlighted
    await asyncio.sleep(2.2)
    status, _ = await api("POST", f"/v1/nodes/{gpu2[0]}/heartbeat", token=gpu2[1])
    status, text, _ = await b.get("/ui/nodes")
    assert re.search(rf'id="node-{gpu1[0]}" class="node node-stale"', text)
    assert re.search(rf'id="node-{gpu2[0]}" class="node node-ready node-failed"', text)


async def test_the_nodes_grid_follows_the_availability_pages_to_the_end(
        node_cache, http, make_token, make_file, make_artifact, monkeypatch):
    from modelcache.server.ui import nodes as ui_nodes
    monkeypatch.setattr(ui_nodes, "MAX_LIMIT", 1)  # a page per report
    server = await node_cache()
    admin = await make_token("admin", "ada")

    async def api(method, path, **kw):
        async with http.request(method, server.make_url(path), headers=bearer(admin), **kw) as r:
            return r.status, await r.json()

    versions = []
    for model in ("llama3", "qwen"):
        made = await make_artifact(make_file(gguf=True, size=4096), model=model, version="1")
        versions.append((await api("GET", f"/v1/artifacts/{made.artifact_id}"))[1]["model_version_id"])
    nodes = [(await api("POST", "/v1/nodes", json={"name": name}))[1]["node"]["id"] for name in ("n1", "n2")]
    for node_id in nodes:
        for version_id in versions:
            status, _ = await api("POST", f"/v1/nodes/{node_id}/availability",
                                  json={"model_version_id": version_id, "status": "available"})
            assert status == 200
    b = browser_for(server, http)
    await b.sign_in(admin)
    status, text, _ = await b.get("/ui/nodes")
    assert status == 200
    for node_id in nodes:
        for version_id in versions:
            assert re.search(rf'id="cell-{node_id}-{version_id}" data-status="available"', text)
