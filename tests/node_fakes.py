"""Node tests' tools: a cache that lies or fails on request, a disk that really fills up, and the real agent.

- ``FakeCache``: the /v1 routes a node uses (blobs, artifacts, loads, acks, availability, heartbeats) served
  from memory by a real aiohttp server on 127.0.0.1, answering like modelcache with whatever a test put in it,
  names the real cache would never store included, and failing where a knob says so.
- ``make_cache`` (a fixture factory): a started ``FakeCache``, e.g. ``await make_cache(blob_delay=0.3)``
  (keyword arguments set knobs); stopped at the end of the test.
- ``make_tmpfs`` (a fixture factory): ``make_tmpfs(4 * MiB, filler=3 * MiB)`` mounts a tmpfs of that many
  bytes, another filesystem than ``tmp_path``, with a file ``filler`` of that many bytes already in it;
  skips, saying why, where mounting is not allowed; unmounted at the end of the test.
- ``make_agent(cache, state_dir, **config)``: a real ``Agent`` pointed at ``cache`` (``config`` as in
  ``AgentConfig``), and ``await run_until(agent, done)``: runs it until ``done()`` holds or the time is up,
  stops it, and says whether ``done()`` held.

A test module uses them with ``from node_fakes import make_cache, make_tmpfs`` (pytest finds imported
fixtures).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from modelcache.node.agent import Agent, AgentConfig
from modelcache.node.pull import PullSettings

KiB, MiB = 1 << 10, 1 << 20


class FakeCache:
    """The node API and blobs of a modelcache, serving whatever the test added, checked or not.

    Knobs (attributes, also keyword arguments of ``make_cache``):
    ``blob_delay`` (seconds each blob answer waits: keeps a pull going while another load asks for the blob),
    ``two_writes`` (a whole-body GET arrives in two TCP writes with a pause between),
    ``html_until`` (every route answers a proxy's maintenance page until that ``time.monotonic()``),
    ``odd_loads`` (that many load polls answer JSON of the wrong shape),
    ``redirect_blobs_to`` (blob GETs are redirected to this base URL).

    Counters: ``requests`` (every request), ``blob_requests``, ``blob_bytes_served`` (body bytes of blob
    answers, whole or ranged), ``heartbeats``; ``reports`` holds every availability report as sent.
    """

    KNOBS = ("blob_delay", "two_writes", "html_until", "odd_loads", "redirect_blobs_to")

    def __init__(self) -> None:
        self.node_id = str(uuid.uuid4())
        self.url = ""
        self.blobs: dict[str, bytes] = {}
        self.artifacts: dict[str, dict] = {}
        self.loads: list[dict] = []
        self.reports: list[dict] = []
        self.requests = 0
        self.blob_requests = 0
        self.blob_bytes_served = 0
        self.heartbeats = 0
        self.blob_delay = 0.0
        self.two_writes = False
        self.html_until = 0.0
        self.odd_loads = 0
        self.redirect_blobs_to: str | None = None
        self.app = web.Application(middlewares=[self._maintenance])
        r = self.app.router
        r.add_get("/v1/blobs/{digest}", self.blob)  # HEAD too
        r.add_get("/v1/artifacts/{ref}", self.artifact)
        r.add_get("/v1/nodes/{node}/loads", self.open_loads)
        r.add_post("/v1/nodes/{node}/loads/{load}/ack", self.ack)
        r.add_post("/v1/nodes/{node}/availability", self.availability)
        r.add_post("/v1/nodes/{node}/heartbeat", self.heartbeat)

    # -- what a test puts in ---------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> dict:
        """Serves ``data``; returns a file entry of an artifact for it (``digest``, ``size_bytes``)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size_bytes": len(data)}

    def add_artifact(self, files: list[dict], *, model: str = "m", version: str = "1", vendor: str | None = "acme",
                     artifact_type: str = "gguf") -> dict:
        """An artifact of ``files`` (entries ``{"path": ..., **cache.add_blob(data)}``), found by id or digest."""
        aid = str(uuid.uuid4())
        artifact = {"id": aid, "digest": f"sha256:{hashlib.sha256(aid.encode()).hexdigest()}", "model": model,
                    "version": version, "vendor": vendor, "artifact_type": artifact_type,
                    "size_bytes": sum(f["size_bytes"] for f in files), "files": files}
        self.artifacts[aid] = self.artifacts[artifact["digest"]] = artifact
        return artifact

    def add_load(self, files: list[dict], **artifact) -> dict:
        """A pending load for this node of a new artifact (``add_artifact``'s arguments)."""
        a = self.add_artifact(files, **artifact)
        load = {"id": str(uuid.uuid4()), "node_id": self.node_id, "model_version_id": str(uuid.uuid4()),
                "model": a["model"], "vendor": a["vendor"], "version": a["version"], "state": "pending",
                "artifact": {k: a[k] for k in ("id", "digest", "size_bytes", "artifact_type")}}
        self.loads.append(load)
        return load

    # -- what a test reads back ----------------------------------------------------------------------------

    def outcome(self, load: dict) -> tuple[str, str | None]:
        """The load's last report other than ``loading``: status and error (``("open", None)`` if none yet)."""
        ends = [r for r in self.reports if r["model_version_id"] == load["model_version_id"]
                and r["status"] != "loading"]
        return (ends[-1]["status"], ends[-1]["details"].get("error")) if ends else ("open", None)

    def all_ended(self) -> bool:
        return all(self.outcome(load)[0] != "open" for load in self.loads)

    # -- the routes ------------------------------------------------------------------------------------------

    @web.middleware
    async def _maintenance(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests += 1
        if time.monotonic() < self.html_until:
            return web.Response(text="<html><body>Down for maintenance</body></html>", content_type="text/html")
        return await handler(request)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.blob_requests += 1
        if self.redirect_blobs_to:
            raise web.HTTPFound(self.redirect_blobs_to + request.path)
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"detail": "no such blob"}, status=404)
        await asyncio.sleep(self.blob_delay)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        if "Range" in request.headers:
            first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
            body = data[first:last + 1]
            self.blob_bytes_served += len(body)
            return web.Response(body=body, status=206, headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})
        self.blob_bytes_served += len(data)
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

    async def artifact(self, request: web.Request) -> web.Response:
        found = self.artifacts.get(request.match_info["ref"])
        return web.json_response(found) if found else web.json_response({"detail": "no such artifact"}, status=404)

    async def open_loads(self, request: web.Request) -> web.Response:
        if self.odd_loads:
            self.odd_loads -= 1
            return web.json_response(["not", "the", "loads", "object"])
        open_ = [load for load in self.loads if load["state"] in ("pending", "loading")]
        if not open_:
            await asyncio.sleep(0.1)
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

    async def make(**knobs) -> FakeCache:
        cache = FakeCache()
        for name, value in knobs.items():
            if name not in FakeCache.KNOBS:
                raise TypeError(f"FakeCache has no knob {name!r} (knobs: {', '.join(FakeCache.KNOBS)})")
            setattr(cache, name, value)
        runner = web.AppRunner(cache.app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        cache.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return cache

    yield make
    for runner in runners:
        await runner.cleanup()


def make_agent(cache: FakeCache, state_dir: Path, **config) -> Agent:
    """A real agent for ``cache``'s node: quick heartbeats, 1 MiB parts two at a time unless ``config`` says."""
    return Agent(AgentConfig(**{"cache_url": cache.url, "node_id": cache.node_id, "token": "node-token",
                                "state_dir": state_dir, "heartbeat_seconds": 0.2,
                                "pull": PullSettings(parallel_parts=2, part_bytes=MiB), **config}))


async def run_until(agent: Agent, done, timeout: float = 30) -> bool:
    """Runs ``agent`` until ``done()`` holds, the agent ends or ``timeout`` seconds pass, then stops it.
    Returns whether ``done()`` held: the caller asserts it, with what helps to see why not."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        deadline = time.monotonic() + timeout
        while not done() and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return done()
    finally:
        stop.set()
        await task
