"""The node's pull client and agent against a cache that lies or fails: a real aiohttp server on 127.0.0.1
that answers like modelcache except where a test tells it not to, real files, the real CLI in a subprocess."""

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

from modelcache.digest import Digest
from modelcache.errors import ModelcacheError
from modelcache.node.agent import Agent, AgentConfig
from modelcache.node.pull import CacheClient, PullSettings

KiB, MiB = 1 << 10, 1 << 20


class FakeCache:
    """The /v1 routes a node uses, from memory. Knobs: ``two_writes`` (a whole-body GET arrives in two TCP writes
    with a pause between), ``html_until`` (a proxy's maintenance page until that monotonic time),
    ``odd_loads`` (that many load polls answer JSON of the wrong shape), ``redirect_blobs_to``."""

    def __init__(self) -> None:
        self.node_id = str(uuid.uuid4())
        self.blobs: dict[str, bytes] = {}
        self.artifacts: dict[str, dict] = {}
        self.loads: list[dict] = []
        self.reports: list[dict] = []
        self.served = 0  # bytes sent in ranged answers
        self.requests = 0
        self.two_writes = False
        self.html_until = 0.0
        self.odd_loads = 0
        self.redirect_blobs_to: str | None = None
        self.url = ""
        self.app = web.Application(middlewares=[self._maintenance])
        r = self.app.router
        r.add_get("/v1/blobs/{digest}", self.blob)
        r.add_get("/v1/artifacts/{ref}", self.artifact)
        r.add_get("/v1/nodes/{node}/loads", self.get_loads)
        r.add_post("/v1/nodes/{node}/loads/{load}/ack", self.ack)
        r.add_post("/v1/nodes/{node}/availability", self.availability)
        r.add_post("/v1/nodes/{node}/heartbeat", self.heartbeat)

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_artifact(self, files: dict[str, bytes], *, model="m", version="1", vendor="acme",
                     artifact_type="safetensors") -> dict:
        entries = [{"path": path, "digest": self.add_blob(data), "size_bytes": len(data)}
                   for path, data in files.items()]
        a = {"id": str(uuid.uuid4()), "digest": "sha256:" + hashlib.sha256(os.urandom(8)).hexdigest(),
             "model": model, "version": version, "vendor": vendor, "artifact_type": artifact_type,
             "size_bytes": sum(e["size_bytes"] for e in entries), "files": entries}
        self.artifacts[a["id"]] = self.artifacts[a["digest"]] = a
        return a

    def add_load(self, a: dict) -> dict:
        load = {"id": str(uuid.uuid4()), "node_id": self.node_id, "model_version_id": str(uuid.uuid4()),
                "model": a["model"], "vendor": a["vendor"], "version": a["version"], "state": "pending",
                "artifact": {"id": a["id"], "digest": a["digest"]}}
        self.loads.append(load)
        return load

    @web.middleware
    async def _maintenance(self, request, handler):
        self.requests += 1
        if time.monotonic() < self.html_until:
            return web.Response(text="<html><body>Down for maintenance</body></html>", content_type="text/html")
        return await handler(request)

    async def blob(self, request):
        if self.redirect_blobs_to:
            raise web.HTTPFound(self.redirect_blobs_to + request.path)
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"detail": "no such blob"}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        if "Range" in request.headers:
            first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
            body = data[first:last + 1]
            self.served += len(body)
            return web.Response(body=body, status=206, headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        try:
            if self.two_writes:
                await resp.write(data[:len(data) // 2])
                await asyncio.sleep(0.3)
                data = data[len(data) // 2:]
            await resp.write(data)
            await resp.write_eof()
        except ConnectionResetError:  # the client stopped reading (a body over its limit)
            pass
        return resp

    async def artifact(self, request):
        a = self.artifacts.get(request.match_info["ref"])
        return web.json_response(a) if a else web.json_response({"detail": "no such artifact"}, status=404)

    async def get_loads(self, request):
        if self.odd_loads:
            self.odd_loads -= 1
            return web.json_response(["not", "the", "loads", "object"])
        open_loads = [x for x in self.loads if x["state"] in ("pending", "loading")]
        if not open_loads:
            await asyncio.sleep(0.1)
        return web.json_response({"loads": open_loads})

    async def ack(self, request):
        for x in self.loads:
            if x["id"] == request.match_info["load"]:
                x["state"] = "loading"
        return web.json_response({})

    async def availability(self, request):
        body = await request.json()
        self.reports.append(body)
        for x in self.loads:
            if x["model_version_id"] == body["model_version_id"] and body["status"] in ("available", "failed"):
                x["state"] = body["status"]
        return web.json_response({})

    async def heartbeat(self, request):
        return web.json_response({})


@pytest.fixture
async def make_cache():
    runners = []

    async def make() -> FakeCache:
        cache = FakeCache()
        runner = web.AppRunner(cache.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        cache.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return cache

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def make_tmpfs(tmp_path):
    """A tmpfs of ``size`` bytes mounted for the test: a disk that really fills up."""
    mounted = []

    def make(size: int) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        for _ in range(20):  # a pull that just exited may still hold the mount for a moment
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)


async def pull_cli(cache: FakeCache, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "modelcache", "pull", *args,
                                                    "--url", cache.url, "--token", "node-token"],
                                   cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def run_agent_until(cache: FakeCache, tmp_path: Path, done, seconds: float = 15.0) -> bool:
    """Runs a real Agent (files runtime) against ``cache`` until ``done()`` holds or ``seconds`` pass."""
    config = AgentConfig(cache_url=cache.url, node_id=cache.node_id, token="node-token", runtimes=("files",),
                         state_dir=tmp_path / "state", files_dir=tmp_path / "files", heartbeat_seconds=1)
    stop = asyncio.Event()
    task = asyncio.create_task(Agent(config).run(stop))
    try:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.1)
        return done()
    finally:
        stop.set()
        await task


# -- a small body in two TCP writes ----------------------------------------------------------------------


async def test_small_blob_in_two_writes_is_read_whole(make_cache):
    cache = await make_cache()
    cache.two_writes = True
    manifest = json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "ab" * 32}] * 8}).encode()
    digest = cache.add_blob(manifest)
    too_big = cache.add_blob(os.urandom(3000))
    async with CacheClient(cache.url, "node-token") as client:
        assert await client.fetch_small(Digest.parse(digest)) == manifest
        with pytest.raises(ModelcacheError, match=r"larger than 2048 bytes"):
            await client.fetch_small(Digest.parse(too_big), limit=2048)


# -- an answer that is not the cache's JSON ------------------------------------------------------------


async def test_agent_waits_out_a_maintenance_page_then_takes_a_load(make_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="modelcache")
    cache = await make_cache()
    cache.add_load(cache.add_artifact({"m.safetensors": os.urandom(100 * KiB)}))
    cache.html_until = time.monotonic() + 2.5  # every route, the agent's first calls included
    taken = await run_agent_until(cache, tmp_path, lambda: any(r["status"] == "available" for r in cache.reports))
    assert taken, [r.getMessage() for r in caplog.records]
    said = [r.getMessage() for r in caplog.records if "text/html" in r.getMessage()]
    assert said and cache.url in said[0] and "200" in said[0] and "Down for maintenance" in said[0], said
    assert (tmp_path / "files" / "acme" / "m" / "1" / "m.safetensors").stat().st_size == 100 * KiB


async def test_agent_loop_survives_an_unexpected_error(make_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="modelcache")
    cache = await make_cache()
    cache.add_load(cache.add_artifact({"m.safetensors": os.urandom(10 * KiB)}))
    cache.odd_loads = 1  # JSON, but a list where the loads object belongs: a TypeError in the loop's step
    taken = await run_agent_until(cache, tmp_path, lambda: any(r["status"] == "available" for r in cache.reports))
    assert taken
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "modelcache.node.agent"]
    assert len(errors) == 1 and errors[0].exc_info and "TypeError" in errors[0].getMessage(), errors


# -- a full disk -------------------------------------------------------------------------------------------


async def test_disk_full_at_the_first_progress_file_is_one_line_and_keeps_nothing(make_cache, make_tmpfs):
    cache = await make_cache()
    disk = make_tmpfs(4 * MiB)
    digest = cache.add_blob(os.urandom(4 * MiB))  # fills the tmpfs when preallocated: no page for the sidecar
    done = await pull_cli(cache, digest, "-o", str(disk / "x.bin"))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "no room left" in line and "x.bin.partial.parts" in line and "nothing partial is kept" in line, line
    assert list(disk.iterdir()) == []


async def test_disk_full_mid_pull_keeps_completed_parts_and_freed_space_resumes(make_cache, make_tmpfs):
    cache = await make_cache()
    disk = make_tmpfs(4 * MiB)
    data = os.urandom(2 * MiB)
    digest = cache.add_blob(data)
    out = disk / "x.bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "pull", digest, "-o", str(out), "--url", cache.url,
        "--part-size", "64k", "--parallel", "1", "--limit-rate", "256k", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    sidecar = disk / "x.bin.partial.parts"
    for _ in range(400):
        await asyncio.sleep(0.02)
        try:
            if len(json.loads(sidecar.read_text())["done"]) >= 2:
                break
        except (OSError, ValueError):
            continue
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # another program takes the rest of the disk
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    stderr = (await proc.stderr.read()).decode()
    assert await proc.wait() == 1
    line = one_line(stderr)
    assert "no room left" in line and "freed space lets `modelcache pull` resume" in line, line
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "x.bin.partial", "x.bin.partial.parts"]

    filler.unlink()
    served_before = cache.served
    done = await pull_cli(cache, digest, "-o", str(out), "--part-size", "64k")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == data
    assert sorted(p.name for p in disk.iterdir()) == ["x.bin"]
    assert cache.served - served_before < len(data)  # the recorded parts were not fetched again


# -- redirects -------------------------------------------------------------------------------------------


async def test_a_redirect_off_the_cache_is_refused(make_cache, tmp_path):
    cache, elsewhere = await make_cache(), await make_cache()
    data = os.urandom(300 * KiB)
    digest = cache.add_blob(data)
    elsewhere.add_blob(data)
    cache.redirect_blobs_to = elsewhere.url
    async with CacheClient(cache.url, "node-token", PullSettings(part_bytes=64 * KiB)) as client:
        with pytest.raises(ModelcacheError) as caught:
            await client.pull_blob(Digest.parse(digest), tmp_path / "x.bin", size=len(data))
    assert elsewhere.url in caught.value.detail and cache.url in caught.value.detail, caught.value.detail
    assert elsewhere.requests == 0
    assert list(tmp_path.iterdir()) == []


# -- names the cache sends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model, version", [("m", "../../../escaped"), ("..", "1")])
async def test_default_output_folder_refuses_names_the_cache_should_never_send(make_cache, tmp_path, model, version):
    cache = await make_cache()
    a = cache.add_artifact({"a.safetensors": b"one", "b/c.safetensors": b"two"}, model=model, version=version)
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    done = await pull_cli(cache, a["digest"], cwd=cwd)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert a["digest"] in line and repr(version if model == "m" else model) in line, line
    assert [p for p in tmp_path.rglob("*")] == [tmp_path / "a", tmp_path / "a" / "b", cwd]
