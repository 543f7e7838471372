"""The management API over real HTTP: auth and audit, validation, registry, actions, policy, tokens."""

import asyncio
import hashlib
import io
import os
import stat

import pytest

from modelcache.digest import Digest
from modelcache.server.v1.api import ENDPOINTS

pytestmark = pytest.mark.registry


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def admin(make_token):
    return await make_token("admin", name="root-admin")


@pytest.fixture
def api(server, http, admin):
    """Call the API: ``await api("GET", "/v1/models", token=..., json=...)`` -> (status, body)."""

    async def call(method, path, token=admin, **kw):
        headers = bearer(token) if token else {}
        async with http.request(method, str(server.make_url(path)), headers=headers, **kw) as r:
            ctype = r.headers.get("Content-Type", "")
            body = await r.json(content_type=None) if "json" in ctype else await r.text()
            return r.status, body

    return call


@pytest.fixture
async def artifact(make_file, make_artifact):
    path = make_file(prefix=b"GGUF", size=4096)
    return await make_artifact(path, model="llama3", version="8b", vendor="meta")


def _concrete(path: str) -> str:
    return (path.replace("{model_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{version_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{artifact}", "sha256:" + "0" * 64).replace("{key}", "models.cache.max_bytes")
            .replace("{name}", "someone").replace("{download_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{node_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{load_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{placement_id}", "00000000-0000-0000-0000-000000000000"))


async def test_node_token_is_denied_every_admin_action_and_each_denial_is_audited(api, make_token, db):
    node = await make_token("node", name="node-7")
    mutating = [ep for ep in ENDPOINTS if "node" not in {r.value for r in ep.roles}]
    assert len(mutating) >= 12
    for ep in mutating:
        status, body = await api(ep.method, _concrete(ep.path), token=node, json={})
        assert status == 403, (ep.method, ep.path, status, body)
        assert body["status"] == 403 and ep.action in body["detail"]
    status, body = await api("GET", "/v1/audit?decision=deny&subject=token:node-7&limit=200")
    assert status == 200
    assert sorted(e["action"] for e in body["events"]) == sorted(ep.action for ep in mutating)
    assert all(e["decision"] == "deny" and e["subject_type"] == "token" for e in body["events"])


async def test_no_token_is_401_and_audited(api):
    status, body = await api("GET", "/v1/models", token=None)
    assert status == 401 and body["title"] == "Unauthorized"
    _, audit = await api("GET", "/v1/audit?decision=deny")
    assert audit["events"][0]["subject_type"] == "anonymous" and audit["events"][0]["action"] == "model.list"


@pytest.mark.parametrize("method,path,kwargs,status,fragment", [
    ("POST", "/v1/tokens", {"data": b"{not json"}, 400, "not valid JSON"),
    ("POST", "/v1/tokens", {"json": {"name": "x", "role": "boss"}}, 422, "field 'role'"),
    ("POST", "/v1/tokens", {"json": {"name": "x", "role": "reader", "colour": "red"}}, 422,
     "field 'colour': unknown field"),
    ("POST", "/v1/tokens", {"json": {"name": 5, "role": "reader"}}, 422, "field 'name'"),
    ("POST", "/v1/tokens", {"data": io.BytesIO(b"x" * (2 << 20))}, 413, ""),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {"json": {"value": "lots"}}, 400,
     "models.cache.max_bytes = 'lots': expected a number"),
    ("PUT", "/v1/preferences/models.cache.colour", {"json": {"value": 1}}, 400, "unknown preference"),
    ("PUT", "/v1/preferences/models.cache.evict_policy", {"json": {"value": "random"}}, 400, "expected one of"),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {"json": {"value": 1, "expected_version": "1"}}, 422,
     "field 'expected_version'"),
    ("GET", "/v1/models?limit=0", {}, 422, "query parameter 'limit'"),
    ("GET", "/v1/models?limit=%D9%A1", {}, 422, "query parameter 'limit'"),  # Arabic-Indic one
    ("GET", "/v1/audit?limit=" + "9" * 4000, {}, 422, "query parameter 'limit'"),
    ("POST", "/v1/imports?model=m&version=1&filename=a%0Db.gguf", {"data": b"x"}, 422, "query parameter 'filename'"),
    ("POST", "/v1/imports?model=m%0A&version=1", {"data": b"x"}, 422, "query parameter 'model'"),
    ("GET", "/v1/models?colour=red", {}, 422, "query parameter 'colour': unknown"),
    ("GET", "/v1/models?cursor=garbage", {}, 400, "invalid cursor"),
    ("GET", "/v1/tokens?cursor=garbage", {}, 400, "invalid cursor"),
    ("GET", "/v1/tokens?limit=201", {}, 422, "query parameter 'limit'"),
    ("GET", "/v1/artifacts/not-an-id", {}, 400, "invalid artifact reference"),
    ("GET", "/v1/artifacts/sha256:" + "0" * 64, {}, 404, "no artifact"),
    ("GET", "/v1/versions/123", {}, 404, "is not an id"),
    ("GET", "/v1/versions?language=a%00b", {}, 400, "value not storable"),
])
async def test_bad_input_gets_a_problem_naming_the_field(api, method, path, kwargs, status, fragment):
    got, body = await api(method, path, **kwargs)
    assert got == status, body
    assert body["status"] == status and fragment in body["detail"]


async def test_models_versions_artifacts_listing_and_filters(api, artifact, make_file, make_artifact):
    other = await make_artifact(make_file(prefix=b"GGUF"), model="qwen", version="7b")
    status, body = await api("GET", "/v1/models?vendor=meta")
    assert status == 200 and [m["name"] for m in body["models"]] == ["llama3"]
    status, body = await api("GET", "/v1/artifacts?model=qwen")
    assert [a["digest"] for a in body["artifacts"]] == [str(other.digest)]
    status, body = await api("GET", f"/v1/artifacts/{artifact.digest}")
    assert body["state"] == "promoted" and body["files"][0]["digest"] == str(artifact.digest)
    assert (body["model"], body["vendor"], body["version"]) == ("llama3", "meta", "8b")
    status, body = await api("GET", "/v1/artifacts?state=promoted&limit=1")
    assert len(body["artifacts"]) == 1 and body["next_cursor"]
    status, second = await api("GET", f"/v1/artifacts?state=promoted&limit=1&cursor={body['next_cursor']}")
    assert second["artifacts"][0]["id"] != body["artifacts"][0]["id"] and second["next_cursor"] is None


async def test_capability_query_finds_versions_by_requirements(api, artifact, make_file, make_artifact):
    await make_artifact(make_file(prefix=b"GGUF"), model="phi", version="mini")
    _, versions = await api("GET", "/v1/versions")
    ids = {v["model"]: v["id"] for v in versions["versions"]}
    status, body = await api("PATCH", f"/v1/versions/{ids['llama3']}",
                             json={"capabilities": {"context_length": 131072, "tool_use": True,
                                                    "languages": ["en", "de"]}, "reason": "model card"})
    assert status == 200 and body["capabilities"]["context_length"] == 131072
    await api("PATCH", f"/v1/versions/{ids['phi']}", json={"capabilities": {"context_length": 4096,
                                                                            "gpu_required": True}})
    _, hit = await api("GET", "/v1/versions?min_context_length=8192&tool_use=true&language=en&language=de")
    assert [v["model"] for v in hit["versions"]] == ["llama3"]
    _, none = await api("GET", "/v1/versions?min_context_length=8192&language=fr")
    assert none["versions"] == []
    _, cpu = await api("GET", "/v1/versions?gpu_required=false")
    assert [v["model"] for v in cpu["versions"]] == ["llama3"]
    status, body = await api("PATCH", f"/v1/versions/{ids['llama3']}",
                             json={"capabilities": {"tool_use": None}, "default_parameters": {"temperature": 0.7}})
    assert "tool_use" not in body["capabilities"] and body["default_parameters"] == {"temperature": 0.7}
    _, audit = await api("GET", "/v1/audit?action=model_version.update")
    assert audit["events"][-1]["reason"] == "model card"


async def test_promote_pin_unpin_are_audited(api, make_token, db, store, make_file, make_artifact):
    async with db.connection() as conn:
        await conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                           "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    staged = await make_artifact(make_file(prefix=b"GGUF"))
    assert staged.state == "staged"
    operator = await make_token("operator", name="ops")
    status, body = await api("POST", f"/v1/artifacts/{staged.digest}/promote", token=operator)
    assert status == 200 and body["state"] == "promoted"
    status, body = await api("POST", f"/v1/artifacts/{staged.digest}/pin", token=operator)
    assert body["pinned"] is True
    status, body = await api("POST", f"/v1/artifacts/{staged.digest}/unpin", token=operator)
    assert body["pinned"] is False
    _, audit = await api("GET", f"/v1/audit?subject=token:ops&resource={staged.digest}")
    assert [e["action"] for e in audit["events"]] == [
        "model_artifact.unpin", "model_artifact.pin", "model_artifact.promote"]


async def test_promote_refuses_a_blob_that_is_missing_on_disk(api, db, store, make_file, make_artifact):
    async with db.connection() as conn:
        await conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                           "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    staged = await make_artifact(make_file(prefix=b"GGUF"))
    store.path_for(staged.digest).unlink()
    status, body = await api("POST", f"/v1/artifacts/{staged.digest}/promote")
    assert status == 409 and "missing on disk" in body["detail"]
    _, audit = await api("GET", "/v1/audit?action=model_artifact.promote")
    assert audit["events"][0]["outcome"] == "refused"


async def test_preference_race_gives_exactly_one_409(api):
    status, prefs = await api("GET", "/v1/preferences")
    entry = next(p for p in prefs["preferences"] if p["key"] == "models.cache.max_bytes")
    assert entry["default"] is True and entry["version"] == 0

    async def put(value):
        return await api("PUT", "/v1/preferences/models.cache.max_bytes",
                         json={"value": value, "expected_version": 0, "reason": f"set {value}"})

    results = await asyncio.gather(put(1_000_000), put(2_000_000))
    assert sorted(s for s, _ in results) == [200, 409]
    loser = next(b for s, b in results if s == 409)
    assert "is at version 1, not 0" in loser["detail"]
    _, prefs = await api("GET", "/v1/preferences")
    entry = next(p for p in prefs["preferences"] if p["key"] == "models.cache.max_bytes")
    assert entry["version"] == 1 and entry["updated_by"] == "token:root-admin"
    _, audit = await api("GET", "/v1/audit?action=preference.update")
    [event] = audit["events"]
    assert event["details"]["old_value"] == 100 * 1024**3 and event["details"]["new_value"] == entry["value"]


async def test_tokens_mint_list_revoke_through_the_api(api, server, http, artifact):
    status, body = await api("POST", "/v1/tokens", json={"name": "worker-1", "role": "node",
                                                         "node_id": "6f1c3d2e-0000-4000-8000-000000000001",
                                                         "expires_in": "12h"})
    assert status == 201 and body["token"].startswith("mc_") and body["expires_at"]
    secret = body["token"]
    _, listing = await api("GET", "/v1/tokens")
    assert "worker-1" in [t["name"] for t in listing["tokens"]]
    assert secret not in str(listing)
    # read-after-write: the server that minted or revoked the token honours that as it answers
    async with http.head(str(server.make_url(f"/v1/blobs/{artifact.digest}")), headers=bearer(secret)) as r:
        assert r.status == 200
    status, body = await api("DELETE", "/v1/tokens/worker-1")
    assert status == 200 and body["revoked_at"]
    async with http.head(str(server.make_url(f"/v1/blobs/{artifact.digest}")), headers=bearer(secret)) as r:
        assert r.status == 401
    status, body = await api("POST", "/v1/tokens", json={"name": "worker-1", "role": "node"})
    assert status == 409 and "name exists" in body["detail"]


async def test_tokens_page_oldest_first_revoked_ones_too(api, db):
    from modelcache.auth import Role, Subject
    from modelcache.tokens import create_token

    for i in range(6):
        await create_token(db, name=f"t{i}", role=Role.READER, subject=Subject.local())
    status, _ = await api("DELETE", "/v1/tokens/t2")
    assert status == 200
    seen, cursor, pages = [], None, 0
    while True:
        status, body = await api("GET", "/v1/tokens", params={"limit": "2", **({"cursor": cursor} if cursor else {})})
        assert status == 200 and len(body["tokens"]) <= 2
        seen += body["tokens"]
        pages += 1
        if (cursor := body["next_cursor"]) is None:
            break
    assert [t["name"] for t in seen] == ["root-admin", "t0", "t1", "t2", "t3", "t4", "t5"] and pages == 4
    assert [t["name"] for t in seen if t["revoked_at"]] == ["t2"]
    _, whole = await api("GET", "/v1/tokens")  # no limit: the first page of 50, here all of them
    assert [t["name"] for t in whole["tokens"]] == [t["name"] for t in seen] and whole["next_cursor"] is None


async def test_preference_history_pages_newest_first_for_managers_only(api, make_token):
    for value in (1000, 2000, 3000):
        status, _ = await api("PUT", "/v1/preferences/models.cache.max_bytes",
                              json={"value": value, "reason": f"to {value}"})
        assert status == 200
    _, page1 = await api("GET", "/v1/preferences/history?limit=2")
    _, page2 = await api("GET", f"/v1/preferences/history?limit=2&cursor={page1['next_cursor']}")
    changes = page1["changes"] + page2["changes"]
    assert [(c["new_value"], c["reason"]) for c in changes] == [(3000, "to 3000"), (2000, "to 2000"),
                                                                 (1000, "to 1000")]
    assert changes[0]["old_value"] == 2000 and page2["next_cursor"] is None
    status, body = await api("GET", "/v1/preferences/history", token=await make_token("reader"))
    assert status == 403 and "preference.history needs role admin or operator" in body["detail"]
    status, body = await api("GET", "/v1/preferences/history?cursor=nonsense")
    assert status == 400 and "invalid cursor" in body["detail"]


async def test_audit_paging_newest_first_and_time_filter(api, make_token):
    for i in range(5):
        await make_token("reader", name=f"r{i}")
    _, page1 = await api("GET", "/v1/audit?action=api_token.create&limit=3")
    _, page2 = await api("GET", f"/v1/audit?action=api_token.create&limit=3&cursor={page1['next_cursor']}")
    names = [e["resource"] for e in page1["events"] + page2["events"]]
    assert names == ["r4", "r3", "r2", "r1", "r0", "root-admin"] and page2["next_cursor"] is None
    _, later = await api("GET", "/v1/audit", params={"since": page1["events"][0]["created_at"],
                                                    "action": "api_token.create"})
    assert [e["resource"] for e in later["events"]] == ["r4"]


async def test_verify_quarantines_a_corrupted_blob_and_the_server_refuses_it(api, server, http, artifact, store):
    path = store.path_for(artifact.digest)
    os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    status, body = await api("POST", f"/v1/artifacts/{artifact.digest}/verify")
    assert status == 200 and body["ok"] is False and "content changed" in body["blobs"][0]["reason"]
    assert body["artifact"]["state"] == "quarantined"
    assert not path.exists() and (store.quarantine_dir / artifact.digest.hex).exists()
    # read-after-write: not served by the server that answered the verify
    status, body = await api("GET", f"/v1/blobs/{artifact.digest}")
    assert status == 404 and "quarantined" in body["detail"]
    _, audit = await api("GET", "/v1/audit?action=blob.quarantine")
    assert audit["events"][0]["resource"] == str(artifact.digest)


async def test_uploading_the_good_bytes_again_restores_a_quarantined_artifact(api, server, http, admin, store,
                                                                             make_file, make_artifact):
    artifact = await make_artifact(make_file(gguf=True, size=4096), model="llama3", version="8b", vendor="meta")
    path = store.path_for(artifact.digest)
    good = path.read_bytes()
    os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    _, body = await api("POST", f"/v1/artifacts/{artifact.digest}/verify")
    assert body["artifact"]["state"] == "quarantined"

    # the operator's road: upload the good file again, as `modelcache upload` does
    status, body = await api("POST", "/v1/imports", params={"model": "llama3", "version": "8b", "vendor": "meta"},
                             data=good)
    assert status == 201 and body["digest"] == str(artifact.digest), body
    status, body = await api("GET", f"/v1/artifacts/{artifact.digest}")
    assert status == 200 and body["state"] == "promoted"
    async with http.get(str(server.make_url(f"/v1/blobs/{artifact.digest}")), headers=bearer(admin)) as r:
        assert r.status == 200 and await r.read() == good  # served again by the server, no restart
    _, body = await api("POST", f"/v1/artifacts/{artifact.digest}/verify")
    assert body["ok"] is True
    _, audit = await api("GET", "/v1/audit?action=model_artifact.import")
    assert audit["events"][0]["outcome"] == "restored"


async def test_the_good_bytes_of_a_shared_blob_restore_every_artifact_quarantined_for_it(api, server, http, admin,
                                                                                        store, tmp_path,
                                                                                        make_artifact):
    from test_hf_api import snapshot_files, write_snapshot

    alpha, beta = snapshot_files("alpha"), snapshot_files("beta")
    shard = "model-00001-of-00002.safetensors"
    beta[shard] = alpha[shard]  # two repos, one identical shard: one blob
    a = await make_artifact(write_snapshot(tmp_path / "alpha", alpha), model="alpha", artifact_type="safetensors")
    b = await make_artifact(write_snapshot(tmp_path / "beta", beta), model="beta", artifact_type="safetensors")
    shared = "sha256:" + hashlib.sha256(alpha[shard]).hexdigest()
    path = store.path_for(Digest.parse(shared))
    os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
    path.write_bytes(b"\0" * len(alpha[shard]))
    _, body = await api("POST", f"/v1/artifacts/{a.digest}/verify")
    assert body["ok"] is False
    assert [(await api("GET", f"/v1/artifacts/{x.digest}"))[1]["state"] for x in (a, b)] == ["quarantined"] * 2

    await make_artifact(write_snapshot(tmp_path / "alpha-again", alpha), model="alpha", artifact_type="safetensors")
    assert [(await api("GET", f"/v1/artifacts/{x.digest}"))[1]["state"] for x in (a, b)] == ["promoted"] * 2
    async with http.get(str(server.make_url(f"/v1/blobs/{shared}")), headers=bearer(admin)) as r:
        assert r.status == 200 and await r.read() == alpha[shard]
    _, audit = await api("GET", "/v1/audit?action=model_artifact.restore")
    [event] = audit["events"]
    assert event["resource"] == str(b.digest) and event["outcome"] == "restored" and str(a.digest) in event["reason"]


async def test_an_evicted_blob_is_not_served_once_the_evict_answered(api, server, http, artifact, make_token):
    reader = bearer(await make_token("reader"))
    url = str(server.make_url(f"/v1/blobs/{artifact.digest}"))
    async with http.head(url, headers=reader) as r:
        assert r.status == 200
    status, body = await api("POST", f"/v1/artifacts/{artifact.artifact_id}/evict")
    assert status == 200 and body["removed_blobs"] == [str(artifact.digest)]
    async with http.head(url, headers=reader) as r:  # read-after-write: no wait for the notification
        assert r.status == 404


async def test_openapi_describes_every_endpoint(api):
    status, doc = await api("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for ep in ENDPOINTS:
        assert ep.method.lower() in doc["paths"][ep.path]


async def test_metrics(api, server, http, artifact):
    async with http.get(str(server.make_url(f"/v1/blobs/{artifact.digest}")),
                        headers=bearer(await _admin_token(api))) as r:
        assert hashlib.sha256(await r.read()).hexdigest() == artifact.digest.hex
    async with http.get(str(server.make_url("/metrics"))) as r:
        text = await r.text()
    assert "modelcache_bytes_served_total 4100.0" in text
    assert 'modelcache_artifacts{state="promoted"} 1.0' in text
    assert "modelcache_cache_bytes_used 4100.0" in text
    assert 'modelcache_events{action="model_artifact.import",outcome="created"} 1.0' in text
    assert 'modelcache_http_requests_total{method="GET",status="200"}' in text


async def _admin_token(api):
    status, body = await api("POST", "/v1/tokens", json={"name": "metrics-reader", "role": "reader"})
    await asyncio.sleep(0.2)
    return body["token"]
