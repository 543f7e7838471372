"""The node agent against a cache that lies or a disk that runs out: what a load reports, what is left on disk.

The cache here is a small aiohttp server on 127.0.0.1 that answers what the agent asks (artifacts, blobs,
loads) with whatever a test puts in it, names the real cache would never store included; the agent is the
real one, run in this process (or as ``modelcache node`` in a subprocess), on real folders.
"""

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from modelcache.errors import Conflict
from modelcache.node.agent import Agent, AgentConfig
from modelcache.node.pull import PullSettings
from modelcache.node.runtimes import Inventory

NODE = str(uuid.uuid4())


class LyingCache:
    """The node API and blobs of a modelcache, serving whatever the test added, checked or not."""

    def __init__(self, blob_delay: float = 0.0) -> None:
        self.blobs: dict[str, bytes] = {}
        self.artifacts: dict[str, dict] = {}
        self.loads: list[dict] = []
        self.reports: list[dict] = []
        self.heartbeats = 0
        self.blob_requests = 0
        self.blob_bytes_served = 0
        self.blob_delay = blob_delay  # keeps a pull going while another load asks for the same blob
        self.app = web.Application()
        self.app.router.add_get("/v1/blobs/{digest}", self.blob)
        self.app.router.add_get("/v1/artifacts/{ref}", self.artifact)
        self.app.router.add_get("/v1/nodes/{node}/loads", self.open_loads)
        self.app.router.add_post("/v1/nodes/{node}/loads/{load}/ack", self.ack)
        self.app.router.add_post("/v1/nodes/{node}/availability", self.availability)
        self.app.router.add_post("/v1/nodes/{node}/heartbeat", self.heartbeat)
        self.url = ""

    def add_blob(self, data: bytes) -> dict:
        """A file entry of an artifact for these bytes."""
        hexdigest = hashlib.sha256(data).hexdigest()
        self.blobs[hexdigest] = data
        return {"digest": f"sha256:{hexdigest}", "size_bytes": len(data)}

    def add_load(self, *, model: str, version: str, files: list[dict], vendor: str | None = "acme",
                 artifact_type: str = "gguf") -> dict:
        aid = str(uuid.uuid4())
        artifact = {"id": aid, "digest": f"sha256:{hashlib.sha256(aid.encode()).hexdigest()}", "model": model,
                    "version": version, "vendor": vendor, "artifact_type": artifact_type,
                    "size_bytes": sum(f["size_bytes"] for f in files), "files": files}
        self.artifacts[aid] = self.artifacts[artifact["digest"]] = artifact
        load = {"id": str(uuid.uuid4()), "node_id": NODE, "model_version_id": str(uuid.uuid4()), "model": model,
                "vendor": vendor, "version": version, "state": "pending",
                "artifact": {k: artifact[k] for k in ("id", "digest", "size_bytes", "artifact_type")}}
        self.loads.append(load)
        return load

    def outcome(self, load: dict) -> tuple[str, str | None]:
        """The load's last report other than ``loading``: status and error."""
        ends = [r for r in self.reports if r["model_version_id"] == load["model_version_id"]
                and r["status"] != "loading"]
        return (ends[-1]["status"], ends[-1]["details"].get("error")) if ends else ("open", None)

    def all_ended(self) -> bool:
        return all(self.outcome(load)[0] != "open" for load in self.loads)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.blob_requests += 1
        data = self.blobs.get(request.match_info["digest"].removeprefix("sha256:"))
        if data is None:
            return web.json_response({"detail": "no such blob"}, status=404)
        await asyncio.sleep(self.blob_delay)
        first, last = 0, len(data) - 1
        if "Range" in request.headers:
            first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
        self.blob_bytes_served += last - first + 1
        if "Range" not in request.headers:
            return web.Response(body=data)
        return web.Response(body=data[first:last + 1], status=206,
                            headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})

    async def artifact(self, request: web.Request) -> web.Response:
        found = self.artifacts.get(request.match_info["ref"])
        return web.json_response(found) if found else web.json_response({"detail": "no artifact"}, status=404)

    async def open_loads(self, request: web.Request) -> web.Response:
        open_ = [load for load in self.loads if load["state"] in ("pending", "loading")]
        if not open_:
            await asyncio.sleep(0.2)
        return web.json_response({"loads": open_})

    async def ack(self, request: web.Request) -> web.Response:
        for load in self.loads:
            if load["id"] == request.match_info["load"]:
                load["state"] = "loading"
        return web.json_response({})

    async def availability(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reports.append(body)
        for load in self.loads:
            if load["model_version_id"] == body["model_version_id"] and body["status"] in ("available", "failed"):
                load["state"] = body["status"]
        return web.json_response({})

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats += 1
        return web.json_response({})


@pytest.fixture
async def make_cache():
    runners = []

    async def make(**kwargs) -> LyingCache:
        cache = LyingCache(**kwargs)
        runner = web.AppRunner(cache.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        cache.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return cache

    yield make
    for runner in runners:
        await runner.cleanup()


def make_agent(cache: LyingCache, state_dir: Path, **config) -> Agent:
    return Agent(AgentConfig(cache_url=cache.url, node_id=NODE, token="node-token", state_dir=state_dir,
                             heartbeat_seconds=0.2, pull=PullSettings(parallel_parts=2, part_bytes=1 << 20),
                             **config))


async def run_until(agent: Agent, done, timeout: float = 30) -> None:
    """Run the agent until ``done()`` is true (or fail after ``timeout`` seconds), then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + timeout
    while not done() and not task.done():
        assert time.monotonic() < deadline, "timed out waiting for the agent"
        await asyncio.sleep(0.05)
    stop.set()
    await task


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.is_dir()} if folder.exists() else set()


# -- 1. names from the cache are parsed before they become folders --------------------------


@pytest.mark.parametrize("runtime,field,value", [
    ("files", "version", "../../../../escaped-files"),
    ("files", "model", ".."),
    ("files", "vendor", "../../escaped-vendor"),
    ("hf", "version", "../../../../pwned-by-hf-ref"),
    ("hf", "model", "x/../../../../escaped-model"),
])
async def test_a_name_that_would_leave_its_folder_fails_the_load(make_cache, tmp_path, runtime, field, value):
    cache = await make_cache()
    names = {"model": "tiny", "version": "1", "vendor": "acme", field: value}
    load = cache.add_load(**names, files=[{"path": "tiny.gguf", **cache.add_blob(b"GGUF weights")}])
    target = tmp_path / "a" / "b" / runtime  # deep enough for the '..'s to land inside tmp_path
    agent = make_agent(cache, tmp_path / "state", runtimes=(runtime,), files_dir=target, hf_cache=target)
    await run_until(agent, cache.all_ended)

    status, error = cache.outcome(load)
    assert status == "failed" and repr(value) in error and f"invalid {field}" in error, error
    assert cache.blob_requests == 0  # refused before anything was pulled
    assert files_under(tmp_path) - files_under(tmp_path / "state") == set()


# -- 2. two loads sharing a blob ----------------------------------------------------------------------------


async def test_two_loads_sharing_a_blob_both_install_from_one_pull(make_cache, tmp_path):
    cache = await make_cache(blob_delay=0.3)
    data = os.urandom(3 << 20)
    blob = cache.add_blob(data)
    loads = [cache.add_load(model="llama3", version=v, files=[{"path": "llama3.gguf", **blob}])
             for v in ("8b", "latest")]
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    await run_until(agent, cache.all_ended)

    assert [cache.outcome(load) for load in loads] == [("available", None)] * 2
    for version in ("8b", "latest"):
        assert (tmp_path / "files" / "acme" / "llama3" / version / "llama3.gguf").read_bytes() == data
    assert cache.blob_bytes_served == len(data)  # pulled once, linked twice


# -- 3. a wrong-shaped installed.json -------------------------------------------------------------------


@pytest.mark.parametrize("content", ["null", "[]", '{"installed": null}', '{"installed": [{"runtime": "files"}]}',
                                     '{"installed": [{"runtime": "files", "model_version_id": "v", '
                                     '"artifact_digest": "sha256:0", "paths": "not a list"}]}'])
async def test_a_wrong_shaped_inventory_is_a_warning_and_an_empty_start(make_cache, tmp_path, caplog, content):
    cache = await make_cache()
    state = tmp_path / "state"
    state.mkdir()
    (state / "installed.json").write_text(content)
    agent = make_agent(cache, state, runtimes=("files",), files_dir=tmp_path / "files")
    with caplog.at_level(logging.WARNING, logger="modelcache.node.runtimes"):
        await run_until(agent, lambda: cache.heartbeats >= 2)

    warnings = [r.getMessage() for r in caplog.records if r.name == "modelcache.node.runtimes"]
    assert len(warnings) == 1 and str(state / "installed.json") in warnings[0], warnings
    assert "empty inventory" in warnings[0] and agent.installed == [] and cache.reports == []


async def test_a_well_formed_inventory_still_loads(tmp_path):
    entry = {"runtime": "files", "model_version_id": "v1", "artifact_digest": "sha256:" + "0" * 64,
             "paths": [str(tmp_path / "m.gguf")]}
    (tmp_path / "installed.json").write_text(json.dumps({"installed": [entry]}))
    assert [e.to_json() for e in Inventory(tmp_path).load()] == [entry]


# -- 4. a copy across filesystems that runs out of room ----------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs of this test's own, 3 MiB of it taken: another filesystem than tmp_path, nearly full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        (folder / "filler").write_bytes(b"\0" * (3 << 20))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


async def test_a_copy_that_runs_out_of_room_leaves_no_temp_file(make_cache, tmp_path, small_tmpfs):
    cache = await make_cache()
    blob = cache.add_blob(os.urandom(3_000_000))
    load = cache.add_load(model="tiny", version="1", files=[{"path": "tiny.gguf", **blob}])
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=small_tmpfs / "files")
    await run_until(agent, cache.all_ended)

    assert files_under(small_tmpfs) == {small_tmpfs / "filler"}  # no .tiny.gguf.<pid>.tmp
    status, error = cache.outcome(load)
    assert status == "failed" and error.startswith("no room to copy blob ") and "\n" not in error, error
    assert str(small_tmpfs / "files" / "acme" / "tiny" / "1" / "tiny.gguf") in error


# -- 5. one agent per state dir ---------------------------------------------------------------------------


async def test_a_second_agent_on_the_same_state_dir_refuses_to_start(make_cache, tmp_path):
    first, second = await make_cache(blob_delay=0.5), await make_cache()
    state = tmp_path / "state"
    load = first.add_load(model="alpha", version="1", files=[{"path": "a.gguf", **first.add_blob(b"alpha")}])
    second.add_load(model="beta", version="1", files=[{"path": "b.gguf", **second.add_blob(b"beta")}])
    running = make_agent(first, state, runtimes=("files",), files_dir=tmp_path / "files-a")
    task = asyncio.create_task(run_until(running, first.all_ended))
    while not first.heartbeats:
        await asyncio.sleep(0.05)

    # in this process, and as `modelcache node` in another: refused, with one line naming the dir
    with pytest.raises(Conflict, match=f"state dir {state} is in use by another node agent .*--state-dir"):
        await asyncio.wait_for(make_agent(second, state, runtimes=("files",), files_dir=tmp_path / "files-b").run(),
                               10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "modelcache", "node", "--url", second.url, "--token", "t", "--node-id", NODE,
        "--runtime", "files", "--files-dir", str(tmp_path / "files-b"), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"modelcache: error: state dir {state} is in use by another node agent (pid {os.getpid()}): "
        "give each agent its own --state-dir (or state_dir in its config)"]

    await task
    assert first.outcome(load) == ("available", None) and second.reports == []
    installed = json.loads((state / "installed.json").read_text())["installed"]
    assert [e["model_version_id"] for e in installed] == [load["model_version_id"]]


# -- 6. names Ollama cannot take -----------------------------------------------------------------------------


@pytest.mark.parametrize("runtimes", [("ollama",), ("files", "ollama")])  # no runtime pulls before ollama refuses
@pytest.mark.parametrize("version", ["1.0+cu121", "v" * 100])
async def test_a_version_ollama_cannot_name_fails_before_any_pull(make_cache, tmp_path, version, runtimes):
    cache = await make_cache()
    layer = cache.add_blob(os.urandom(100_000))
    config = cache.add_blob(b'{"model_format":"gguf"}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config["digest"],
                   "size": config["size_bytes"]},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": layer["digest"],
                    "size": layer["size_bytes"]}]}).encode()
    load = cache.add_load(model="tiny", version=version, artifact_type="ollama", files=[
        {"path": "manifest", **cache.add_blob(manifest)}, {"path": "blobs/sha256-x", **layer}])
    agent = make_agent(cache, tmp_path / "state", runtimes=runtimes, ollama_models=tmp_path / "ollama",
                       files_dir=tmp_path / "files")
    await run_until(agent, cache.all_ended)

    status, error = cache.outcome(load)
    assert status == "failed" and error.startswith("invalid Ollama model name") and version in error, error
    assert cache.blob_requests == 0 and not (tmp_path / "ollama").exists() and not (tmp_path / "files").exists()
    assert files_under(tmp_path / "state" / "blobs") == set()


# -- an answer the agent did not expect fails that load, not the agent ----------------------------------------


async def test_an_artifact_of_an_unexpected_shape_fails_its_load_and_the_next_load_installs(make_cache, tmp_path,
                                                                                          caplog):
    cache = await make_cache()
    odd = cache.add_load(model="odd", version="1", files=[{"path": "odd.gguf", **cache.add_blob(b"GGUF odd")}])
    del cache.artifacts[odd["artifact"]["id"]]["files"]  # the same dict under its digest too
    good = cache.add_load(model="good", version="1", files=[{"path": "good.gguf", **cache.add_blob(b"GGUF good")}])
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    await run_until(agent, cache.all_ended)

    status, error = cache.outcome(odd)
    assert status == "failed" and error.startswith("KeyError"), error
    assert cache.outcome(good) == ("available", None)
    assert (tmp_path / "files" / "acme" / "good" / "1" / "good.gguf").read_bytes() == b"GGUF good"
