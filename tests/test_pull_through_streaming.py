"""A blob still being fetched by a pull-through download is streamed to the client as its bytes arrive.

The upstream is a second modelcache process (test_download_sources.py's), reached through a slow proxy
on loopback (an aiohttp server in this process) that hands each large blob out in slices over about
four seconds, and can lie: change a byte of one blob and keep its length, so the digest the manifest
declares does not match. Our cache and its worker run in one process, as ``modelcache run`` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import aiohttp
import psycopg
import pytest
from aiohttp import web

from test_download_sources import UPSTREAM_TOKEN, upstream  # noqa: F401
from test_downloads import allow, bearer, worker  # noqa: F401
from test_oci_clients import DOCKER
from test_pull_through import download_rows, make_pt_settings, upstream_manifest  # noqa: F401
from modelcache import preferences
from modelcache.auth import Subject

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

SLICES = 20
SLICE_SECONDS = 0.2  # a large blob takes SLICES * SLICE_SECONDS = 4 s through the proxy
SLOW_FROM_BYTES = 4096  # smaller bodies (manifests, the config blob, metadata) pass at once


class SlowProxy:
    """Forwards GETs to the upstream; a large blob's (or /hf file's) body is sent in slices, and ``lie_about``
    (a digest) gets its last byte changed."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.lie_about: str | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.session = aiohttp.ClientSession(auto_decompress=False)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() in
                   ("authorization", "accept", "range", "if-range", "accept-encoding", "user-agent")}
        async with self.session.get(self.target + request.path_qs, headers=headers, allow_redirects=False) as up:
            body = await up.read()
            kept = {k: v for k, v in up.headers.items() if k.lower() in
                    ("content-type", "etag", "last-modified", "accept-ranges", "content-range", "docker-content-digest",
                     "www-authenticate", "x-repo-commit", "x-error-code", "x-error-message", "location")}
            if self.lie_about and request.path.endswith("/blobs/" + self.lie_about) and body:
                body = body[:-1] + bytes([body[-1] ^ 0xFF])  # the same length, another digest
            response = web.StreamResponse(status=up.status, headers=kept)
            response.content_length = len(body)
            await response.prepare(request)
            if ("/blobs/" in request.path or "/resolve/" in request.path) and len(body) >= SLOW_FROM_BYTES:
                step = -(-len(body) // SLICES)
                for at in range(0, len(body), step):
                    await response.write(body[at:at + step])
                    await asyncio.sleep(SLICE_SECONDS)
            else:
                await response.write(body)
            await response.write_eof()
            return response


@pytest.fixture
async def slow_cache(upstream, make_pt_settings, start_server, worker, db, monkeypatch):  # noqa: F811
    """Our cache, its ollama source behind the slow proxy, pull-through on, no approval; (server, proxy)."""
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    proxy = SlowProxy(upstream.url)
    await proxy.start()
    settings = make_pt_settings({"registry": ("ollama", proxy.url), "hub": ("huggingface", upstream.url + "hf")})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "registry", "hub")
    await preferences.set_preference(db, "models.download.pull_through", True, Subject.local())
    yield server, proxy
    await proxy.stop()


@pytest.fixture
async def slow_hub(upstream, make_pt_settings, start_server, worker, db, monkeypatch):  # noqa: F811
    """Our cache, its huggingface source (the upstream's /hf) behind the slow proxy; (server, proxy)."""
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    proxy = SlowProxy(upstream.url)
    await proxy.start()
    settings = make_pt_settings({"hub": ("huggingface", proxy.url + "hf")})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "hub")
    await preferences.set_preference(db, "models.download.pull_through", True, Subject.local())
    yield server, proxy
    await proxy.stop()


async def manifest_during_transfer(http, server, node: str) -> tuple[bytes, dict]:
    """The /v2 miss is answered with the registry's manifest as soon as the download knows it."""
    started = time.monotonic()
    async with http.get(server.make_url("/v2/meta/tinyllama/manifests/1b"),
                        headers={**bearer(node), "Accept": DOCKER}) as r:
        raw = await r.read()
        assert r.status == 200, raw
    assert time.monotonic() - started < 3  # before the blobs (4 s through the proxy) are in
    doc = json.loads(raw)
    return raw, max(doc["layers"], key=lambda layer: layer["size"])


async def read_timed(response: aiohttp.ClientResponse, asked_at: float) -> tuple[bytes, float]:
    """The body and the seconds from the request to its first byte."""
    first = await response.content.readany()
    first_at = time.monotonic() - asked_at
    return first + await response.read(), first_at


def state(dsn: str) -> str:
    return download_rows(dsn)[-1]["state"]


async def test_a_layer_blob_is_streamed_while_it_is_fetched_whole_and_by_range(
        upstream, slow_cache, http, dsn, make_token):  # noqa: F811
    server, _ = slow_cache
    node = await make_token("node", name="node-s")
    raw, layer = await manifest_during_transfer(http, server, node)
    assert raw == await upstream_manifest(http, upstream, "meta/tinyllama", "1b")
    content = upstream.gguf_bytes
    assert layer["digest"] == "sha256:" + hashlib.sha256(content).hexdigest() and layer["size"] == len(content)
    url = server.make_url(f"/v2/meta/tinyllama/blobs/{layer['digest']}")

    async def whole() -> tuple[bytes, float, float, str]:
        asked = time.monotonic()
        async with http.get(url, headers=bearer(node)) as r:
            assert r.status == 200 and r.content_length == len(content)
            running = state(dsn)
            body, first = await read_timed(r, asked)
        return body, first, time.monotonic() - asked, running

    async def ranged() -> tuple[bytes, float, str]:
        asked = time.monotonic()
        async with http.get(url, headers={**bearer(node), "Range": "bytes=100-9999"}) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 100-9999/{len(content)}"
            body, first = await read_timed(r, asked)
        return body, first, r.headers["Content-Length"]

    async with http.head(url, headers=bearer(node)) as r:  # what Ollama asks first: answered at once
        assert r.status == 200 and r.content_length == len(content)
    (body, first, took, running), (part, part_first, part_length) = await asyncio.gather(whole(), ranged())
    assert running == "running"  # the headers came while the download was still fetching
    assert first < 1.0, f"first byte after {first:.2f}s"
    assert took >= 3.0, f"the whole body took {took:.2f}s: it was not fetched while streamed"
    assert body == content and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
    assert part == content[100:10000] and part_length == str(9900) and part_first < 1.0
    # the download completes; the blob is then served from the store as any other
    for _ in range(100):
        if state(dsn) == "completed":
            break
        await asyncio.sleep(0.1)
    assert state(dsn) == "completed"
    async with http.get(server.make_url(f"/v1/blobs/{layer['digest']}"), headers=bearer(node)) as r:
        assert r.status == 200 and await r.read() == content


async def test_a_blob_whose_upstream_lies_about_its_digest_is_cut_short_and_then_404(
        upstream, slow_cache, http, dsn, make_token, caplog):  # noqa: F811
    server, proxy = slow_cache
    content = upstream.gguf_bytes
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    proxy.lie_about = digest
    node = await make_token("node", name="node-l")
    _, layer = await manifest_during_transfer(http, server, node)
    assert layer["digest"] == digest
    got = bytearray()
    with caplog.at_level(logging.WARNING, logger="modelcache.server.blobs.inflight"):
        async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{digest}"), headers=bearer(node)) as r:
            assert r.status == 200 and r.content_length == len(content)
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
    assert 0 < len(got) < len(content)  # closed before the declared length: never a whole wrong body
    assert bytes(got) == content[:len(got)]  # the proxy changed only the last byte, which was held back
    assert any("cut off" in m and digest in m for m in caplog.messages), caplog.messages
    for _ in range(100):
        if state(dsn) == "failed":
            break
        await asyncio.sleep(0.1)
    assert state(dsn) == "failed"
    assert "sha256" in download_rows(dsn)[-1]["error"]
    async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{digest}"), headers=bearer(node)) as r:
        assert r.status == 404
    async with http.get(server.make_url(f"/v1/blobs/{digest}"), headers=bearer(node)) as r:
        assert r.status == 404


async def test_a_refs_miss_pulls_through_and_answers_the_branches(
        upstream, slow_cache, http, dsn, make_token):  # noqa: F811
    server, _ = slow_cache
    node = await make_token("node", name="node-r")
    async with http.get(server.make_url("/hf/api/models/acme/tiny/refs"), headers=bearer(node)) as r:
        body = await r.json()
        assert r.status == 200, body
    assert [b["name"] for b in body["branches"]][:1] == ["main"] and body["branches"][0]["targetCommit"]
    [row] = download_rows(dsn)
    assert (row["source"], row["reference"], row["state"], row["requested_by"]) == \
        ("hub", "acme/tiny@main", "completed", "token:node-r")
    async with http.get(server.make_url(f"/hf/api/models/acme/tiny/revision/{body['branches'][0]['targetCommit']}"),
                        headers=bearer(node)) as r:
        assert r.status == 200


HF_CLIENT = r'''
import hashlib, json, sys, time
from pathlib import Path
from huggingface_hub import hf_hub_download

started = time.monotonic()
path = Path(hf_hub_download(sys.argv[1], sys.argv[2]))  # HEAD (2 s at most here), then GET
print(json.dumps({"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "commit": path.parents[0].name,
                  "seconds": time.monotonic() - started}))
'''


async def test_an_hf_file_of_a_repository_still_being_fetched_is_streamed(
        upstream, slow_hub, http, dsn, make_token, tmp_path):  # noqa: F811
    """``/hf/.../resolve/main/<file>`` missed while its repository is fetched: answered at once (the Hub
    declared the file's sha256, and the commit id it will have is known), its bytes as they arrive, so
    hf_hub_download's HEAD (which it gives HF_HUB_ETAG_TIMEOUT, here 2 s) does not time out while the
    repository takes about four seconds."""
    server, _ = slow_hub
    node = await make_token("node", name="node-h")
    name = "model-00001-of-00002.safetensors"
    content = upstream.snapshot_files[name]
    assert len(content) >= 4096  # slowed by the proxy: about four seconds
    sha = hashlib.sha256(content).hexdigest()
    script = tmp_path / "client.py"
    script.write_text(HF_CLIENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=str(server.make_url("/hf")), HF_TOKEN=node, HF_HOME=str(tmp_path / "hf-home"),
               NO_PROXY="127.0.0.1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="2")
    client = asyncio.create_task(asyncio.to_thread(
        subprocess.run, [sys.executable, str(script), "acme/tiny", name], env=env, capture_output=True, text=True,
        timeout=120))

    url = server.make_url(f"/hf/acme/tiny/resolve/main/{name}")
    asked = time.monotonic()
    async with http.head(url, headers=bearer(node)) as r:  # what hf_hub_download asks first
        assert r.status == 200, r.headers.get("X-Error-Message")
        head = r.headers
    assert time.monotonic() - asked < 2
    assert head["ETag"] == f'"{sha}"' and int(head["X-Linked-Size"]) == len(content)
    commit = head["X-Repo-Commit"]
    asked = time.monotonic()
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200 and r.content_length == len(content)
        assert r.headers["X-Repo-Commit"] == commit
        running = state(dsn)
        body, first = await read_timed(r, asked)
    took = time.monotonic() - asked
    assert running == "running"  # the headers came while the repository was still being fetched
    assert first < 1.0, f"first byte after {first:.2f}s"
    assert took >= 2.0, f"the whole body took {took:.2f}s: it was not fetched while streamed"
    assert hashlib.sha256(body).hexdigest() == sha

    done = await client
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["sha256"] == sha
    for _ in range(100):
        if state(dsn) == "completed":
            break
        await asyncio.sleep(0.1)
    assert state(dsn) == "completed"
    # the commit the client was told while the repository was fetched is the one it now has
    async with http.get(server.make_url("/hf/api/models/acme/tiny/revision/main"), headers=bearer(node)) as r:
        assert r.status == 200
        info = await r.json()
    assert info["sha"] == commit == got["commit"]
    assert len(download_rows(dsn)) == 1  # the HEAD, the GETs and the client's requests made one download
