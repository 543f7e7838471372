"""Issue 11, placements end to end: a real ``modelcache serve`` and two node agents as processes; a placement
for a label both carry ends with both ``available``, without any selection call."""

import asyncio
import subprocess
import sys

import pytest
from aiohttp import ClientSession

from test_embedded import free_port, wait_ready
from test_node_e2e import Agent, clean_env, wait_for

pytestmark = [pytest.mark.registry, pytest.mark.e2e]


async def test_a_placement_warms_both_agents_without_selection(dsn, settings, tmp_path, make_token, make_file,
                                                              make_artifact):
    result = await make_artifact(make_file(gguf=True, size=1 << 20), model="warm", version="1")
    admin = {"Authorization": f"Bearer {await make_token('admin')}"}  # before the server starts: it loads tokens
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "modelcache", "serve", "--dsn", dsn, "--data-dir",
                              str(settings.data_dir), "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=log, env=clean_env(MODELCACHE_SERVER_PUBLIC_URL=url))
    agents: list[Agent] = []
    try:
        await asyncio.to_thread(wait_ready, port, serve)
        async with ClientSession(url) as http:
            async def api(method, path, **kw):
                async with http.request(method, path, headers=admin, **kw) as r:
                    body = await r.json()
                    assert r.status < 400, (method, path, r.status, body)
                    return body

            version_id = (await api("GET", f"/v1/artifacts/{result.artifact_id}"))["model_version_id"]
            for name, runtimes in (("a", ["ollama"]), ("b", ["files"])):
                body = await api("POST", "/v1/nodes", json={"name": f"warm-{name}", "labels": {"pool": "warm"},
                                                            "facts": {"runtimes": runtimes}})
                agent = Agent(tmp_path, name, url, body["config"]["node_id"], body["config"]["token"], runtimes)
                agent.start()
                agents.append(agent)
            await api("POST", "/v1/nodes", json={"name": "elsewhere", "labels": {"pool": "cold"}})

            placement = await api("POST", "/v1/placements", json={"selector": {"pool": "warm"},
                                                                  "model_version_ids": [version_id]})
            assert (placement["nodes_matching"], len(placement["load_requests"])) == (2, 2)

            async def both_ready():
                listed = await api("GET", "/v1/placements")
                return listed["placements"][0]["nodes_ready"] == 2

            await wait_for(both_ready, timeout=60, what="both agents to report available")
            held = await api("GET", f"/v1/versions/{version_id}/nodes")
            assert sorted((a["node_name"], a["status"]) for a in held["availability"]) == [
                ("warm-a", "available"), ("warm-b", "available")]
            selections = await api("GET", "/v1/audit", params={"action": "model_version.select"})
            assert selections["events"] == []
            loads = await api("GET", "/v1/audit", params={"action": "node_load.update"})
            assert sorted(e["outcome"] for e in loads["events"]) == ["available", "available"]
    finally:
        for agent in agents:
            agent.stop()
        serve.terminate()
        serve.wait(30)
        log.close()
