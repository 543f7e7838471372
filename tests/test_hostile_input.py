"""Hostile input, one row per case, over real HTTP: a 4xx (or the RFC's answer), never a 500, and
nothing a later read trips over. Rows stored before the bounds existed are read without a 500."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest

from conftest import gguf_bytes, run_cli, safetensors_bytes
from modelcache.jsonvalue import MAX_DEPTH, TOO_DEEP
from modelcache.server.keys import HF_INDEX

pytestmark = pytest.mark.registry


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def world(server, make_file, make_artifact, make_token, tmp_path, running_apps, db):
    """A GGUF (for /v1 and /v2 blobs), a safetensors snapshot (for /hf) and an admin token."""
    gguf = await make_artifact(make_file(content=gguf_bytes(n_floats=1024), name="tiny.gguf"), model="tiny",
                               version="1", vendor="meta")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"]}))
    (snapshot / "model.safetensors").write_bytes(safetensors_bytes({"a": ("F32", [16, 16])}))
    await make_artifact(snapshot, model="tiny", version="1", vendor="acme", artifact_type="safetensors")
    for app in running_apps:
        await app[HF_INDEX].reload()
    async with db.connection() as conn:
        version = (await (await conn.execute("SELECT v.id FROM model_versions v JOIN models m ON m.id = v.model_id "
                                             "WHERE m.vendor = 'meta'")).fetchone())["id"]
    return {"gguf": str(gguf.digest), "version": str(version), "admin": await make_token("admin")}


DEEP_1000 = ("[" * 1000 + "]" * 1000).encode()
BLOB_URLS = ["/v1/blobs/{gguf}", "/v2/meta/tiny/blobs/{gguf}", "/hf/acme/tiny/resolve/main/config.json"]

# (method, path, headers, body, status); a body that is not bytes is sent as JSON
HOSTILE = [
    ("PATCH", "/v1/versions/{version}", {}, {"capabilities": nested(300)}, 400),
    ("PATCH", "/v1/versions/{version}", {}, {"capabilities": nested(MAX_DEPTH)}, 400),  # the body adds a level
    ("PATCH", "/v1/versions/{version}", {}, {"default_parameters": {"x": [1e308 * 10]}}, 400),
    ("PATCH", "/v1/versions/{version}", {}, b'{"capabilities": {"x": NaN}}', 400),
    ("PATCH", "/v1/versions/{version}", {}, {"capabilities": {"x" * 70_000: 1}}, 400),
    ("PATCH", "/v1/versions/{version}", {}, {"capabilities": {"big": int("9" * 400)}}, 400),
    ("POST", "/v1/tokens", {}, DEEP_1000, 400),
    ("POST", "/v1/tokens", {}, b'{"name": ' + b"[" * 100_000, 400),
    ("PUT", "/v1/preferences/models.cache.evict_policy", {}, b'{"value": ' + DEEP_1000 + b"}", 400),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {}, {"value": int("9" * 400)}, 400),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {}, {"value": 2**63}, 400),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {}, {"value": 1.5}, 400),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {}, {"value": 1e300}, 400),
    ("PUT", "/v1/preferences/models.cache.max_bytes", {}, {"value": -1}, 400),
    ("GET", "/v1/models?limit=" + "9" * 4000, {}, None, 422),
    ("GET", "/v1/models?limit=%D9%A1", {}, None, 422),
    ("GET", "/v2/_catalog?n=%D9%A1", {}, None, 400),
    ("GET", "/hf/api/models/acme/tiny/tree/main?limit=%C2%B2", {}, None, 400),
    *[row for url in BLOB_URLS for row in [
        ("GET", url, {"Range": "bytes=" + "9" * 5000 + "-"}, None, 416),  # first byte past the end
        ("GET", url, {"Range": "bytes=" + "9" * 4000 + "-" + "9" * 4000}, None, 416),
        ("GET", url, {"Range": "bytes=0-" + "9" * 5000}, None, 206),  # last byte past the end: cut there
        ("GET", url, {"Range": "bytes=-" + "9" * 5000}, None, 206),  # a suffix longer than the file: all of it
        ("GET", url, {"Range": "bytes=١-٢"}, None, 200),  # not DIGITs: malformed, ignored (RFC 9110 14.2)
        ("GET", url, {"Range": "bytes=１-２"}, None, 200),
        ("GET", url, {"Range": "bytes=0-0"}, None, 206),  # the control row
    ]],
]


@pytest.mark.parametrize("method,path,headers,body,status", HOSTILE,
                         ids=[f"{i}-{m}-{p[:30]}" for i, (m, p, *_) in enumerate(HOSTILE)])
async def test_hostile_request_is_answered_and_poisons_nothing(server, http, world, method, path, headers, body,
                                                              status):
    url = str(server.make_url(path.format(**world)))
    kw = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    async with http.request(method, url, headers={**bearer(world["admin"]), **headers}, **kw) as r:
        text = (await r.read()).decode(errors="replace")
        assert r.status == status, text[:500]
        if status >= 400 and path.startswith("/v1") and "blobs" not in path:
            assert r.headers["Content-Type"].startswith("application/problem+json"), text[:200]
    for read in ("/v1/versions", "/v1/audit?limit=200", "/v1/preferences", "/metrics"):
        async with http.get(str(server.make_url(read)), headers=bearer(world["admin"])) as r:
            assert r.status == 200, (read, (await r.text())[:500])


async def test_a_bad_preference_names_the_key_and_value(server, http, world):
    url = str(server.make_url("/v1/preferences/models.cache.max_bytes"))
    async with http.put(url, json={"value": 1.5}, headers=bearer(world["admin"])) as r:
        body = await r.json(content_type=None)
    assert r.status == 400
    assert body["detail"] == ("preference models.cache.max_bytes = 1.5: expected a number of bytes: an integer "
                              "from 0 to 9223372036854775807")
    async with http.put(url, json={"value": int("9" * 400)}, headers=bearer(world["admin"])) as r:
        body = await r.json(content_type=None)
    assert r.status == 400
    assert body["detail"].startswith("the body is out of bounds at value: the integer 99999999999999999999...(400 ")


async def test_rows_stored_before_the_bounds_are_read_without_a_500(server, http, world, dsn):
    """What an older modelcache let in (or SQL put there) is shown with the deep part replaced."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE model_versions SET capabilities = %s::jsonb WHERE id = %s",
                     (json.dumps(nested(300)), world["version"]))
        conn.execute("INSERT INTO model_audit_log (subject_type, subject_id, action, resource_type, resource, "
                     "decision, outcome, details) VALUES ('token', 'old', 'model_version.update', 'model_version', "
                     "%s, 'allow', 'ok', %s::jsonb)", (world["version"], json.dumps({"capabilities": nested(300)})))
        conn.execute("INSERT INTO model_audit_log (subject_type, subject_id, action, resource_type, resource, "
                     "decision, outcome, details) VALUES ('token', 'old', 'model_version.update', 'model_version', "
                     "%s, 'allow', 'ok', %s::jsonb)", (world["version"], "[" * 5000 + "]" * 5000))
        conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                     "VALUES ('system', 'models.cache.max_bytes', %s::jsonb, 'number', 'old')", ("9" * 400,))
    headers = bearer(world["admin"])
    async with http.get(str(server.make_url("/v1/versions")), headers=headers) as r:
        assert r.status == 200, await r.text()
        caps = next(v for v in (await r.json())["versions"] if v["id"] == world["version"])["capabilities"]
    depth = 1
    while isinstance(caps, dict) and "a" in caps:
        caps, depth = caps["a"], depth + 1
    assert caps == TOO_DEEP and depth == MAX_DEPTH + 1  # 32 levels kept, the 33rd replaced
    async with http.get(str(server.make_url("/v1/audit?limit=200")), headers=headers) as r:
        assert r.status == 200, await r.text()
        details = [e["details"] for e in (await r.json())["events"] if e["subject_id"] == "old"]
    assert {"unreadable": TOO_DEEP} in details and len(details) == 2
    async with http.get(str(server.make_url("/v1/preferences")), headers=headers) as r:
        assert r.status == 200, await r.text()
        entry = next(p for p in (await r.json())["preferences"] if p["key"] == "models.cache.max_bytes")
    assert entry["default"] is True and entry["value"] == 100 * 1024**3
    async with http.get(str(server.make_url("/metrics"))) as r:
        assert r.status == 200
        samples = dict(line.rsplit(" ", 1) for line in (await r.text()).splitlines() if not line.startswith("#"))
    assert float(samples["modelcache_cache_bytes_max"]) == 100 * 1024**3
    env = {"MODELCACHE_URL": str(server.make_url("")).rstrip("/"), "MODELCACHE_TOKEN": world["admin"]}
    done = await asyncio.to_thread(run_cli, "audit", env=env)
    assert done.returncode == 0, done.stderr
    assert "old" in done.stdout


@pytest.mark.parametrize("raw,fragment", [
    (b'{"name": "m", "capabilities": ' + DEEP_1000 + b"}", "nested deeper than 32 levels"),
    (json.dumps({"name": "m", "capabilities": nested(40)}).encode(), "nested deeper than 32 levels"),
    (b'{"name": "m", "capabilities": {"x": Infinity}}', "not valid JSON"),
])
def test_a_sidecar_too_deep_is_refused_naming_it(tmp_path: Path, raw, fragment):
    """The import folder's sidecars are JSON from outside too: refused by the same rule, never a crash."""
    from modelcache.errors import InvalidInput
    from modelcache.syncd.naming import read_sidecar

    sidecar = tmp_path / "m.gguf.json"
    sidecar.write_bytes(raw)
    with pytest.raises(InvalidInput, match=fragment) as caught:
        read_sidecar(sidecar, ("name", "capabilities"))
    assert str(sidecar) in caught.value.detail
