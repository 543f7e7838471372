"""Issue 11 end to end: a real ``modelcache run`` (with its import daemon) and node agents as processes."""

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import ClientSession

from conftest import gguf_bytes
from modelcache.formats.ollama import Manifest, ModelName, ModelsDir
from test_embedded import free_port, wait_ready

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

MiB = 1 << 20


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELCACHE_", "HF_", "OLLAMA_"))}
    env.update(extra)
    return env


class Agent:
    def __init__(self, tmp: Path, name: str, url: str, node_id: str, token: str, runtimes: list[str],
                 limit_rate: int | None = None) -> None:
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.config = self.dir / "node.toml"
        pull = f"\n[pull]\nparallel_parts = 1\npart_bytes = 262144\n" + (f"limit_rate = {limit_rate}\n" if limit_rate else "")
        self.config.write_text(f'cache_url = "{url}"\nnode_id = "{node_id}"\ntoken = "{token}"\n'
                               f'runtimes = {json.dumps(runtimes)}\nstate_dir = "{self.dir / "state"}"\n'
                               f'ollama_models = "{self.dir / "ollama"}"\nhf_cache = "{self.dir / "hf"}"\n'
                               f'files_dir = "{self.dir / "files"}"\nheartbeat_seconds = 1\n{pull}')
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "modelcache", "node", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log, env=clean_env())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


async def wait_for(check, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_drop_select_load_install_use(dsn, tmp_path, make_token, db):
    data = tmp_path / "data"
    port = free_port()
    admin = {"Authorization": f"Bearer {await make_token('admin')}"}  # before the server starts: it loads tokens
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen([sys.executable, "-m", "modelcache", "run", "--dsn", dsn, "--data-dir", str(data),
                            "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log,
                           env=clean_env(MODELCACHE_SYNCD_SETTLE_SECONDS="0.2",
                                         MODELCACHE_SERVER_PUBLIC_URL=f"http://127.0.0.1:{port}"))
    agents: list[Agent] = []
    try:
        await asyncio.to_thread(wait_ready, port, run)
        url = f"http://127.0.0.1:{port}"
        async with ClientSession(url) as http:
            async def api(method, path, **kw):
                async with http.request(method, path, headers=admin, **kw) as r:
                    body = await r.json()
                    assert r.status < 400, (method, path, r.status, body)
                    return body

            nodes = {}
            for name, runtimes in (("a", ["ollama", "hf"]), ("b", ["files"])):
                body = await api("POST", "/v1/nodes", json={"name": f"node-{name}", "labels": {"pool": "x"},
                                                            "facts": {"runtimes": runtimes}})
                nodes[name] = body["config"]
                agents.append(Agent(tmp_path, name, url, body["config"]["node_id"], body["config"]["token"],
                                    runtimes, limit_rate=4 * MiB if name == "a" else None))
            a_id, b_id = nodes["a"]["node_id"], nodes["b"]["node_id"]

            # a GGUF dropped into the import folder
            content = gguf_bytes(n_floats=2 * MiB)  # 8 MiB of weights
            (data / "import").mkdir(parents=True, exist_ok=True)
            (tmp_path / "tiny.gguf").write_bytes(content)
            os.rename(tmp_path / "tiny.gguf", data / "import" / "tiny.gguf")

            async def promoted():
                body = await api("GET", "/v1/artifacts", params={"model": "tiny", "state": "promoted"})
                return body["artifacts"][0] if body["artifacts"] else None

            artifact = await wait_for(promoted, what="the import")
            size, version = artifact["size_bytes"], artifact["version"]
            assert artifact["digest"] == "sha256:" + hashlib.sha256(content).hexdigest()

            chosen = await api("POST", "/v1/select", json={"model": "tiny", "nodes": [a_id]})
            assert chosen["action"] == "load" and chosen["node"]["id"] == a_id, chosen

            # A's agent starts pulling; killed mid-pull, restarted, it completes without starting over
            a = agents[0]
            a.start()
            sidecar = a.dir / "state" / "blobs" / "sha256" / f"{artifact['digest'][7:]}.partial.parts"

            async def some_parts():
                try:
                    return len(json.loads(sidecar.read_text())["done"]) >= 8
                except (OSError, ValueError):
                    return False

            await wait_for(some_parts, what="A's pull to be under way")
            a.kill()
            a.start()

            async def a_has_it():
                body = await api("GET", f"/v1/nodes/{a_id}/availability")
                return any(x["status"] == "available" for x in body["availability"])

            await wait_for(a_has_it, timeout=60, what="A to report available")
            models = ModelsDir(a.dir / "ollama")
            host = f"127.0.0.1:{port}"
            path = models.find_manifest(ModelName.parse(f"{host}/library/tiny:{version}"))
            async with http.get(f"/v2/library/tiny/manifests/{version}", headers={
                    **admin, "Accept": "application/vnd.docker.distribution.manifest.v2+json"}) as r:
                assert path.read_bytes() == await r.read()
            for d in Manifest.parse(path.read_bytes(), str(path)).blobs:
                assert hashlib.sha256(models.blob_path(d.digest).read_bytes()).hexdigest() == d.digest.hex
            assert models.blob_path(Manifest.parse(path.read_bytes(), "m").layers[0].digest).read_bytes() == content

            await asyncio.sleep(1.0)  # the server writes its access log twice a second
            sent = sum(int(m.group(1)) for line in (tmp_path / "run.log").read_text().splitlines()
                       if f"digest={artifact['digest']}" in line and " GET /v1/blobs/" in line
                       for m in [re.search(r" bytes=(\d+) ", line)] if m)
            assert size <= sent < 1.5 * size, (sent, size)

            chosen = await api("POST", "/v1/select", json={"model": "tiny", "nodes": [a_id]})
            assert chosen["action"] == "use" and chosen["node"]["id"] == a_id, chosen
            agents[1].start()
            await api("PUT", "/v1/preferences/models.nodes.prefer_local_cache", json={"value": True})
            chosen = await api("POST", "/v1/select", json={"model": "tiny", "nodes": [b_id, a_id]})
            assert chosen["action"] == "use" and chosen["node"]["id"] == a_id, chosen

            # the hf runtime's result loads offline
            script = ("import sys, huggingface_hub as h; "
                      "print(h.snapshot_download('tiny', revision=sys.argv[2], cache_dir=sys.argv[1]))")
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script, str(a.dir / "hf"), version],
                                           env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            folder = Path(done.stdout.strip().splitlines()[-1])
            assert (folder / "tiny.gguf").read_bytes() == content

            # the manifest removed: A reports evicted
            path.unlink()

            async def a_evicted():
                body = await api("GET", f"/v1/nodes/{a_id}/availability")
                return any(x["status"] == "evicted" for x in body["availability"])

            await wait_for(a_evicted, timeout=20, what="A to report evicted")
    finally:
        for agent in agents:
            agent.stop()
        run.terminate()
        run.wait(60)
        log.close()
