"""Nodes, server side, over real HTTP: registration, availability, long-polled load requests,
selection, placements, the loading timeout, and eviction while a node loads."""

import asyncio
import hashlib
import os
import subprocess
import time
import uuid

import pytest

pytestmark = pytest.mark.registry


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def cache(make_settings, start_server, http, make_token):
    """Start a server for some ``[nodes]`` settings; returns an ``api(method, path, token=admin, ...)``."""

    async def start(**nodes_settings):
        settings = make_settings(**{f"nodes.{k}": str(v) for k, v in nodes_settings.items()})
        srv = await start_server(settings)
        admin = await make_token("admin", name=f"admin-{uuid.uuid4().hex[:6]}")

        async def api(method, path, token=admin, **kw):
            async with http.request(method, str(srv.make_url(path)), headers=bearer(token) if token else {},
                                    **kw) as r:
                body = await r.json(content_type=None) if "json" in r.headers.get("Content-Type", "") else None
                return r.status, body

        api.admin = admin
        api.url = str(srv.make_url("")).rstrip("/")
        return api

    return start


@pytest.fixture
def gguf_version(make_file, make_artifact):
    """Import (and so promote) a small GGUF; returns (artifact id, digest, version id)."""

    async def make(model="llama3", version="8b", vendor="meta"):
        return await make_artifact(make_file(gguf=True, size=4096), model=model, version=version, vendor=vendor,
                                   inspect=True)

    return make


async def version_of(api, result) -> str:
    status, body = await api("GET", f"/v1/artifacts/{result.artifact_id}")
    assert status == 200
    return body["model_version_id"]


async def register(api, name, labels=None, runtimes=("ollama",), **facts):
    status, body = await api("POST", "/v1/nodes", json={"name": name, "labels": labels or {},
                                                        "facts": {"runtimes": list(runtimes), **facts}})
    assert status == 201, body
    return body


async def audit_events(api, **query):
    status, body = await api("GET", "/v1/audit", params={"limit": "200", **query})
    assert status == 200
    return body["events"]


async def test_registration_answers_the_config_and_registering_again_revokes_the_old_token(cache, settings):
    api = await cache()
    first = await register(api, "gpu-1", {"pool": "gpu"}, gpu_memory_bytes=24 << 30, free_disk_bytes=1 << 40)
    config, node = first["config"], first["node"]
    assert config["cache_url"] == settings.public_url and config["node_id"] == node["id"]
    assert config["pull"] == {"parallel_parts": 4, "part_bytes": 67108864}
    assert config["token"].startswith("mc_")
    assert config["runtime_env"] == {"HF_ENDPOINT": f"{settings.public_url}/hf", "HF_TOKEN": config["token"]}
    assert node["status"] == "ready" and node["labels"] == {"pool": "gpu"}
    assert node["facts"]["runtimes"] == ["ollama"] and node["facts"]["gpu_memory_bytes"] == 24 << 30

    status, beat = await api("POST", f"/v1/nodes/{node['id']}/heartbeat", token=config["token"])
    assert status == 200 and beat["id"] == node["id"]

    again = await register_with_id(api, node["id"], "gpu-1b")
    assert again["node"]["name"] == "gpu-1b" and again["config"]["token"] != config["token"]
    status, _ = await api("POST", f"/v1/nodes/{node['id']}/heartbeat", token=config["token"])
    assert status == 401  # the first registration's token is revoked
    status, _ = await api("POST", f"/v1/nodes/{node['id']}/heartbeat", token=again["config"]["token"], json={})
    assert status == 200

    status, page = await api("GET", "/v1/nodes")
    assert [n["name"] for n in page["nodes"]] == ["gpu-1b"]
    events = await audit_events(api, action="node.register")
    assert [e["outcome"] for e in events] == ["updated", "registered"]
    assert all(config["token"] not in str(e) for e in events)

    status, gone = await api("DELETE", f"/v1/nodes/{node['id']}")
    assert status == 200
    status, _ = await api("POST", f"/v1/nodes/{node['id']}/heartbeat", token=again["config"]["token"])
    assert status == 401
    status, _ = await api("GET", f"/v1/nodes/{node['id']}")
    assert status == 404


async def register_with_id(api, node_id, name):
    status, body = await api("POST", "/v1/nodes", json={"id": node_id, "name": name})
    assert status == 201, body
    return body


async def test_a_node_token_acts_only_for_its_own_node_and_denials_are_audited(cache, gguf_version):
    api = await cache()
    version_id = await version_of(api, await gguf_version())
    a, b = await register(api, "a"), await register(api, "b")
    token_a = a["config"]["token"]
    report = {"model_version_id": version_id, "status": "available", "details": {"runtime": "ollama"}}
    status, body = await api("POST", f"/v1/nodes/{b['node']['id']}/availability", token=token_a, json=report)
    assert status == 403 and b["node"]["id"] in body["detail"]
    status, _ = await api("GET", f"/v1/nodes/{b['node']['id']}/loads", token=token_a)
    assert status == 403
    status, _ = await api("POST", "/v1/nodes", token=token_a, json={"name": "sneaky"})
    assert status == 403
    status, _ = await api("POST", f"/v1/nodes/{a['node']['id']}/availability", token=token_a, json=report)
    assert status == 200

    denied = await audit_events(api, decision="deny", subject=f"token:{a['config']['token_name']}")
    assert sorted(e["action"] for e in denied) == ["node.register", "node_availability.report", "node_load.list"]
    assert {e["resource"] for e in denied if e["action"] != "node.register"} == {b["node"]["id"]}
    status, held = await api("GET", f"/v1/nodes/{b['node']['id']}/availability")
    assert held["availability"] == []


async def test_a_silent_node_turns_stale_and_a_heartbeat_brings_it_back(cache):
    api = await cache(heartbeat_timeout=0.4)
    node = (await register(api, "n1"))["node"]
    await asyncio.sleep(0.6)
    status, body = await api("GET", f"/v1/nodes/{node['id']}")
    assert body["status"] == "stale"
    status, body = await api("POST", f"/v1/nodes/{node['id']}/heartbeat",
                             json={"facts": {"runtimes": ["ollama", "hf"], "free_disk_bytes": 5}})
    assert status == 200 and body["status"] == "ready" and body["facts"]["runtimes"] == ["ollama", "hf"]
    events = await audit_events(api, action="node.heartbeat")
    assert events[0]["outcome"] == "ready" and events[0]["details"]["was_stale"] is True


async def test_availability_is_upserted_and_listed_by_node_and_by_version(cache, gguf_version):
    api = await cache()
    version_id = await version_of(api, await gguf_version())
    node = await register(api, "n1")
    node_id, token = node["node"]["id"], node["config"]["token"]
    for status_, details in (("loading", {"bytes_done": 10}), ("loading", {"bytes_done": 20}),
                             ("available", {"runtime": "ollama", "bytes_done": 4096})):
        status, body = await api("POST", f"/v1/nodes/{node_id}/availability", token=token,
                                 json={"model_version_id": version_id, "status": status_, "details": details})
        assert status == 200 and body["status"] == status_
    status, by_node = await api("GET", f"/v1/nodes/{node_id}/availability")
    assert [(a["model_version_id"], a["status"], a["model"], a["version"]) for a in by_node["availability"]] == [
        (version_id, "available", "llama3", "8b")]
    assert by_node["availability"][0]["details"] == {"runtime": "ollama", "bytes_done": 4096}
    status, by_version = await api("GET", f"/v1/versions/{version_id}/nodes")
    assert [a["node_id"] for a in by_version["availability"]] == [node_id]
    status, detail = await api("GET", f"/v1/nodes/{node_id}")
    assert detail["available_models"] == 1 and detail["availability"][0]["status"] == "available"
    # two changes audited (none -> loading, loading -> available); the progress report is not a change
    events = await audit_events(api, action="node_availability.report")
    assert [(e["details"]["from"], e["details"]["to"]) for e in events] == [("loading", "available"),
                                                                           (None, "loading")]
    status, body = await api("POST", f"/v1/nodes/{node_id}/availability", token=token,
                             json={"model_version_id": str(uuid.uuid4()), "status": "available"})
    assert status == 404


async def test_a_long_poll_is_answered_the_moment_a_load_is_requested(cache, gguf_version):
    api = await cache()
    result = await gguf_version()
    version_id = await version_of(api, result)
    node = await register(api, "n1")
    node_id, token = node["node"]["id"], node["config"]["token"]

    poll = asyncio.create_task(api("GET", f"/v1/nodes/{node_id}/loads?wait=20", token=token))
    await asyncio.sleep(0.3)
    assert not poll.done()
    status, load = await api("POST", f"/v1/nodes/{node_id}/loads", json={"model_version_id": version_id})
    created = time.monotonic()
    assert status == 201 and load["state"] == "pending"
    status, body = await poll
    waited = time.monotonic() - created
    assert status == 200 and waited < 5.0, waited  # a moment after the request, not the 20 s it could wait
    assert [x["id"] for x in body["loads"]] == [load["id"]]
    assert body["loads"][0]["artifact"] == {"id": str(result.artifact_id), "digest": str(result.digest),
                                            "size_bytes": result.size, "artifact_type": "gguf"}

    status, again = await api("POST", f"/v1/nodes/{node_id}/loads", json={"model_version_id": version_id})
    assert again["id"] == load["id"]  # no duplicate while one is open
    status, acked = await api("POST", f"/v1/nodes/{node_id}/loads/{load['id']}/ack", token=token)
    assert status == 200 and acked["state"] == "loading"
    await api("POST", f"/v1/nodes/{node_id}/availability", token=token,
              json={"model_version_id": version_id, "status": "available"})

    started = time.monotonic()
    status, body = await api("GET", f"/v1/nodes/{node_id}/loads?wait=1", token=token)
    assert body == {"loads": []} and 0.9 < time.monotonic() - started < 10
    actions = [e["action"] for e in await audit_events(api, resource=load["id"])]
    assert actions == ["node_load.update", "node_load.ack", "node_load.request"]


async def test_selection_prefers_the_node_that_has_the_version_unless_told_not_to(cache, gguf_version, tmp_path):
    api = await cache()
    result = await gguf_version()
    version_id = await version_of(api, result)
    a, b = await register(api, "a-node"), await register(api, "b-node")
    pick = {"requirements": {"min_context_length": 4096}, "model": "meta/llama3",
            "nodes": [a["node"]["id"], b["node"]["id"]]}

    status, first = await api("POST", "/v1/select", json=pick)
    assert status == 200, first
    assert first["action"] == "load" and first["node"]["name"] == "a-node"  # a tie: fewest models, then name
    assert first["load_request"]["state"] == "pending" and first["artifact"]["digest"] == str(result.digest)
    assert first["version"] == {"id": version_id, "model": "llama3", "vendor": "meta", "version": "8b"}
    assert first["pull"]["curl"].endswith(f"/v1/blobs/{result.digest}")
    assert first["pull"]["ollama"].endswith("/meta/llama3:8b") and first["pull"]["hf"] is None
    # the curl line works as pasted into a shell with TOKEN set (pointed at this test's port)
    curl = first["pull"]["curl"]
    curl = curl.replace(curl.rsplit(" ", 1)[1].split("/v1/blobs/")[0], api.url)
    fetched = await asyncio.to_thread(subprocess.run, ["bash", "-c", curl + " --fail --silent"],
                                      cwd=tmp_path, env={"PATH": os.environ["PATH"], "TOKEN": a["config"]["token"]})
    assert fetched.returncode == 0
    assert hashlib.sha256((tmp_path / "llama3-8b.gguf").read_bytes()).hexdigest() == result.digest.hex

    await api("POST", f"/v1/nodes/{a['node']['id']}/availability", token=a["config"]["token"],
              json={"model_version_id": version_id, "status": "available"})
    status, second = await api("POST", "/v1/select", json=pick)
    assert second["action"] == "use" and second["node"]["name"] == "a-node" and second["load_request"] is None

    status, _ = await api("PUT", "/v1/preferences/models.nodes.prefer_local_cache", json={"value": False})
    assert status == 200
    status, third = await api("POST", "/v1/select", json=pick)
    assert third["action"] == "load" and third["node"]["name"] == "b-node"  # fewer models loaded
    assert any("prefer_local_cache is false" in r for r in third["reasons"])
    events = await audit_events(api, action="model_version.select")
    assert [e["outcome"] for e in events] == ["load", "use", "load"]


async def test_selection_skips_stale_failed_and_unfit_nodes_and_says_why(cache, gguf_version, db):
    api = await cache()
    result = await gguf_version()
    version_id = await version_of(api, result)
    await api("PATCH", f"/v1/versions/{version_id}", json={"capabilities": {"gpu_required": True}})
    stale = await register(api, "stale")
    failed = await register(api, "failed")
    small = await register(api, "small-disk", free_disk_bytes=10)
    wrong = await register(api, "wrong-runtime", runtimes=["mlx"])
    weak = await register(api, "weak-gpu", gpu_memory_bytes=10)
    async with db.connection() as conn:
        await conn.execute("UPDATE nodes SET last_seen_at = now() - interval '1 hour' WHERE id = %s",
                           (stale["node"]["id"],))
    await api("POST", f"/v1/nodes/{failed['node']['id']}/availability", token=failed["config"]["token"],
              json={"model_version_id": version_id, "status": "failed", "details": {"error": "disk full"}})

    status, body = await api("POST", "/v1/select", json={"model": "meta/llama3"})
    assert status == 409 and body["status"] == 409
    reasons = "\n".join(body["reasons"])
    assert "stale" in reasons and "disk full" in reasons and "free disk 10 bytes" in reasons
    assert "runtimes (mlx)" in reasons and "GPU memory 10 bytes" in reasons
    for n in (stale, failed, small, wrong, weak):
        assert n["node"]["id"] in reasons

    status, body = await api("POST", "/v1/select", json={"requirements": {"min_context_length": 10 ** 9}})
    assert status == 422 and "no model version" in body["detail"]

    good = await register(api, "good", gpu_memory_bytes=80 << 30, free_disk_bytes=1 << 40)
    status, body = await api("POST", "/v1/select", json={"requirements": {"gpu_required": True}})
    assert status == 200 and body["node"]["id"] == good["node"]["id"] and body["action"] == "load"
    events = await audit_events(api, action="model_version.select")
    assert [e["outcome"] for e in events] == ["load", "no_fit", "no_fit"]


async def test_a_placement_warms_matching_nodes_including_one_that_registers_later(cache, gguf_version):
    api = await cache()
    version_id = await version_of(api, await gguf_version())
    a = await register(api, "a", {"pool": "gpu"})
    b = await register(api, "b", {"pool": "gpu", "zone": "x"})
    await register(api, "c", {"pool": "cpu"})
    status, placement = await api("POST", "/v1/placements", json={"selector": {"pool": "gpu"},
                                                                  "model_version_ids": [version_id]})
    assert status == 201, placement
    assert sorted(load["node_id"] for load in placement["load_requests"]) == sorted(
        [a["node"]["id"], b["node"]["id"]])
    assert (placement["nodes_matching"], placement["nodes_ready"]) == (2, 0)

    late = await register(api, "late", {"pool": "gpu"})
    status, loads = await api("GET", f"/v1/nodes/{late['node']['id']}/loads", token=late["config"]["token"])
    assert [x["model_version_id"] for x in loads["loads"]] == [version_id]

    for n in (a, b, late):
        await api("POST", f"/v1/nodes/{n['node']['id']}/availability", token=n["config"]["token"],
                  json={"model_version_id": version_id, "status": "available"})
    status, listed = await api("GET", "/v1/placements")
    assert [(p["nodes_matching"], p["nodes_ready"]) for p in listed["placements"]] == [(3, 3)]
    status, loads = await api("GET", f"/v1/nodes/{late['node']['id']}/loads", token=late["config"]["token"])
    assert loads["loads"] == []  # the report finished the request

    status, by_requirements = await api("POST", "/v1/placements", json={
        "selector": {"pool": "cpu"}, "requirements": {"min_context_length": 1024}})
    assert status == 201 and by_requirements["resolved_version_ids"] == [version_id]
    assert len(by_requirements["load_requests"]) == 1
    status, _ = await api("DELETE", f"/v1/placements/{placement['id']}")
    assert status == 200
    status, listed = await api("GET", "/v1/placements")
    assert [p["id"] for p in listed["placements"]] == [by_requirements["id"]]


async def test_a_silent_load_fails_after_the_loading_timeout(cache, gguf_version):
    api = await cache(loading_timeout=0.4)
    version_id = await version_of(api, await gguf_version())
    node = await register(api, "n1")
    node_id, token = node["node"]["id"], node["config"]["token"]
    status, load = await api("POST", f"/v1/nodes/{node_id}/loads", json={"model_version_id": version_id})
    await api("POST", f"/v1/nodes/{node_id}/loads/{load['id']}/ack", token=token)
    await api("POST", f"/v1/nodes/{node_id}/availability", token=token,
              json={"model_version_id": version_id, "status": "loading", "details": {"bytes_done": 1}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, held = await api("GET", f"/v1/nodes/{node_id}/availability")
        if held["availability"][0]["status"] == "failed":
            break
        await asyncio.sleep(0.1)
    assert held["availability"][0]["status"] == "failed"
    assert "loading_timeout" in held["availability"][0]["details"]["error"]
    status, loads = await api("GET", f"/v1/nodes/{node_id}/loads", token=token)
    assert loads["loads"] == []
    assert (await audit_events(api, action="node_load.timeout"))[0]["resource"] == load["id"]
    assert (await audit_events(api, action="node_availability.timeout"))[0]["resource"] == node_id


async def test_an_artifact_a_node_is_loading_is_not_evicted(cache, gguf_version):
    api = await cache()
    result = await gguf_version()
    version_id = await version_of(api, result)
    node = await register(api, "n1")
    node_id, token = node["node"]["id"], node["config"]["token"]
    status, load = await api("POST", f"/v1/nodes/{node_id}/loads", json={"model_version_id": version_id})
    status, body = await api("POST", f"/v1/artifacts/{result.artifact_id}/evict")
    assert status == 409 and node_id in body["detail"]
    await api("POST", f"/v1/nodes/{node_id}/loads/{load['id']}/ack", token=token)
    status, body = await api("POST", f"/v1/artifacts/{result.artifact_id}/evict")
    assert status == 409
    await api("POST", f"/v1/nodes/{node_id}/availability", token=token,
              json={"model_version_id": version_id, "status": "available"})
    status, body = await api("POST", f"/v1/artifacts/{result.artifact_id}/evict")
    assert status == 200 and body["artifact"]["state"] == "evicted"


async def test_the_cli_registers_a_node_writes_its_config_selects_and_places(cache, gguf_version, tmp_path):
    import json
    import tomllib

    from conftest import run_cli

    api = await cache()
    version_id = await version_of(api, await gguf_version())
    env = {"MODELCACHE_URL": api.url, "MODELCACHE_TOKEN": api.admin}

    async def cli(*args):
        return await asyncio.to_thread(run_cli, *args, env=env)

    out = tmp_path / "node.toml"
    done = await cli("node-register", "edge-1", "--label", "pool=edge", "--runtime", "ollama",
                     "--free-disk-bytes", str(1 << 40), "--config-out", str(out))
    assert done.returncode == 0, done.stderr
    config = tomllib.loads(out.read_text())
    assert config["runtimes"] == ["ollama"] and config["token"].startswith("mc_")
    assert config["pull"] == {"parallel_parts": 4, "part_bytes": 67108864}
    assert out.stat().st_mode & 0o077 == 0  # the token is for its owner only
    status, _ = await api("POST", f"/v1/nodes/{config['node_id']}/heartbeat", token=config["token"])
    assert status == 200

    done = await cli("nodes")
    assert done.returncode == 0 and "edge-1" in done.stdout and "pool=edge" in done.stdout
    done = await cli("select", "--model", "meta/llama3", "--min-context-length", "1024", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["action"] == "load"
    done = await cli("select", "--min-context-length", str(10 ** 9))
    assert done.returncode == 2 and "no model version" in done.stderr
    done = await cli("place", "--selector", "pool=edge", "--version", version_id)
    assert done.returncode == 0, done.stderr
    done = await cli("placements", "--json")
    assert [p["nodes_matching"] for p in json.loads(done.stdout)["placements"]] == [1]
    done = await cli("load", config["node_id"], version_id, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "pending"


async def test_a_version_ollama_cannot_name_goes_to_no_ollama_only_node(cache, gguf_version, make_token):
    api = await cache()
    version_id = await version_of(api, await gguf_version(version="1.0+cu121"))
    only_ollama = (await register(api, "o1", runtimes=("ollama",)))["node"]["id"]
    also_files = (await register(api, "o2", runtimes=("ollama", "files")))["node"]["id"]

    status, problem = await api("POST", f"/v1/nodes/{only_ollama}/loads", json={"model_version_id": version_id})
    assert status == 409 and "its only runtime, ollama, cannot take it" in problem["detail"], problem
    assert "invalid Ollama model name" in problem["detail"]
    status, load = await api("POST", f"/v1/nodes/{also_files}/loads", json={"model_version_id": version_id})
    assert status == 201 and load["artifact"]["artifact_type"] == "gguf"
    status, chosen = await api("POST", "/v1/select", json={"model": "meta/llama3"})
    assert status == 200 and chosen["node"]["id"] == also_files, chosen
    assert any("o1" in r and "cannot take it" in r for r in chosen["reasons"]), chosen["reasons"]


async def test_a_long_poll_is_woken_by_a_load_another_process_requests(cache, gguf_version, db):
    """The server hears of a request it did not make through LISTEN/NOTIFY, not by polling."""
    from modelcache.auth import Subject
    from modelcache.nodes import registry

    api = await cache()
    version_id = await version_of(api, await gguf_version())
    node = await register(api, "n1")
    node_id, token = node["node"]["id"], node["config"]["token"]
    poll = asyncio.create_task(api("GET", f"/v1/nodes/{node_id}/loads?wait=20", token=token))
    await asyncio.sleep(0.5)  # the poll is waiting
    assert not poll.done()
    # another pool than the server's, as another modelcache process would be
    load, created = await registry.create_load(db, uuid.UUID(node_id), uuid.UUID(version_id), Subject.local())
    made = time.monotonic()
    status, body = await poll
    assert created and status == 200 and [x["id"] for x in body["loads"]] == [str(load["id"])]
    assert time.monotonic() - made < 5.0  # heard, not the 20 s the poll could wait


async def test_every_nodes_availability_and_load_requests_are_listed_for_readers(cache, gguf_version, make_token):
    api = await cache()
    version_id = await version_of(api, await gguf_version())
    a, b = await register(api, "a"), await register(api, "b")
    status, first = await api("POST", f"/v1/nodes/{a['node']['id']}/loads", json={"model_version_id": version_id})
    assert status == 201
    status, second = await api("POST", f"/v1/nodes/{b['node']['id']}/loads", json={"model_version_id": version_id})
    status, _ = await api("POST", f"/v1/nodes/{a['node']['id']}/availability", token=a["config"]["token"],
                          json={"model_version_id": version_id, "status": "available"})
    reader = await make_token("reader", "watcher")
    status, held = await api("GET", "/v1/availability", token=reader)
    assert status == 200
    assert [(x["node_name"], x["status"]) for x in held["availability"]] == [("a", "available")]
    status, loads = await api("GET", "/v1/loads", token=reader)
    assert status == 200 and loads["next_cursor"] is None
    # newest first; the report moved a's request on
    assert [(x["id"], x["state"]) for x in loads["loads"]] == [(second["id"], "pending"), (first["id"], "available")]
    status, pending = await api("GET", "/v1/loads", token=reader, params={"state": "pending"})
    assert [x["id"] for x in pending["loads"]] == [second["id"]]
    status, of_a = await api("GET", "/v1/loads", token=reader, params={"node_id": a["node"]["id"], "limit": "1"})
    assert [x["id"] for x in of_a["loads"]] == [first["id"]] and of_a["next_cursor"] is None
    status, paged = await api("GET", "/v1/loads", token=reader, params={"limit": "1"})
    assert [x["id"] for x in paged["loads"]] == [second["id"]] and paged["next_cursor"]
    status, rest = await api("GET", "/v1/loads", token=reader, params={"limit": "1", "cursor": paged["next_cursor"]})
    assert [x["id"] for x in rest["loads"]] == [first["id"]]
    status, _ = await api("GET", "/v1/loads", token=a["config"]["token"])
    assert status == 403  # a node sees its own requests only (GET /v1/nodes/{id}/loads)


async def walk(api, path, limit=2, between=None):
    """Every row of a /v1 list, ``limit`` at a time, following next_cursor; ``between`` runs after each page.
    Returns (rows, pages)."""
    key = "placements" if path.endswith("placements") else "availability"
    rows, cursor, pages = [], None, 0
    while True:
        status, body = await api("GET", path, params={"limit": str(limit), **({"cursor": cursor} if cursor else {})})
        assert status == 200, body
        assert len(body[key]) <= limit
        rows += body[key]
        pages += 1
        if (cursor := body["next_cursor"]) is None:
            return rows, pages
        if between is not None:
            await between()


async def test_availability_lists_page_in_an_order_that_new_reports_do_not_move(cache, gguf_version):
    api = await cache()
    versions = [await version_of(api, await gguf_version(model=f"m{i}")) for i in range(3)]
    nodes = [(await register(api, f"n{i}"))["node"]["id"] for i in range(4)]

    async def report_all(status):
        for node_id in nodes:
            for version_id in versions:
                got, body = await api("POST", f"/v1/nodes/{node_id}/availability",
                                      json={"model_version_id": version_id, "status": status})
                assert got == 200, body

    await report_all("loading")
    # every report is renewed after each page (last_checked_at moves): the walk still sees each row once
    rows, pages = await walk(api, "/v1/availability", between=lambda: report_all("available"))
    pairs = [(r["node_id"], r["model_version_id"]) for r in rows]
    assert len(pairs) == 12 == len(set(pairs)) and pages == 6
    assert set(pairs) == {(n, v) for n in nodes for v in versions}
    assert [n for n, _ in pairs] == [n for n in nodes for _ in versions]  # by node, oldest registered first
    _, whole = await api("GET", "/v1/availability")  # no limit: the first page of 50, here all of it
    assert [(r["node_id"], r["model_version_id"]) for r in whole["availability"]] == pairs
    assert whole["next_cursor"] is None and {r["status"] for r in whole["availability"]} == {"available"}

    of_node, pages = await walk(api, f"/v1/nodes/{nodes[1]}/availability")
    assert sorted(r["model_version_id"] for r in of_node) == sorted(versions) and pages == 2
    assert {r["node_id"] for r in of_node} == {nodes[1]}
    of_version, pages = await walk(api, f"/v1/versions/{versions[2]}/nodes")
    assert [r["node_id"] for r in of_version] == nodes and pages == 2
    assert {r["model_version_id"] for r in of_version} == {versions[2]}

    for path in ("/v1/availability", f"/v1/nodes/{nodes[0]}/availability", f"/v1/versions/{versions[0]}/nodes"):
        status, problem = await api("GET", path, params={"cursor": "not-a-cursor"})
        assert status == 400 and problem["status"] == 400 and "invalid cursor" in problem["detail"], path
        status, problem = await api("GET", path, params={"limit": "0"})
        assert status == 422 and "query parameter 'limit'" in problem["detail"], path


async def test_placements_page_oldest_first_and_the_cli_lists_them_all(cache, gguf_version, db):
    import json

    from conftest import run_cli
    from modelcache.db import nodes as rows

    api = await cache()
    version_id = await version_of(api, await gguf_version())
    await register(api, "g1", {"pool": "p0"})
    made = []
    for i in range(5):
        status, body = await api("POST", "/v1/placements", json={"selector": {"pool": f"p{i}"},
                                                                 "model_version_ids": [version_id]})
        assert status == 201, body
        made.append(body["id"])
    listed, pages = await walk(api, "/v1/placements")
    assert [p["id"] for p in listed] == made and pages == 3
    assert [p["nodes_matching"] for p in listed] == [1, 0, 0, 0, 0]  # counted on every page
    status, problem = await api("GET", "/v1/placements", params={"cursor": "bm90IGEgY3Vyc29y"})
    assert status == 400 and "invalid cursor" in problem["detail"]

    # more than the API answers at once (200): the CLI follows next_cursor to the end
    async with db.transaction() as conn:
        for i in range(200):
            made.append(str((await rows.insert_placement(conn, {"pool": f"bulk-{i}"}, [uuid.UUID(version_id)],
                                                          None, "test"))["id"]))
    env = {"MODELCACHE_URL": api.url, "MODELCACHE_TOKEN": api.admin}
    done = await asyncio.to_thread(run_cli, "placements", "--json", env=env)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    ids = [p["id"] for p in body["placements"]]
    # one transaction: the 200 share a created_at, and their ids order them among themselves
    assert ids[:5] == made[:5] and len(ids) == 205 == len(set(ids)) and set(ids) == set(made)
    assert body["next_cursor"] is None
