"""A blob a separate ``modelcache fetchd`` process is still fetching is streamed by the server as it arrives.

The server is this test's app; the download runs in a real ``modelcache fetchd`` subprocess on the same
data dir and database, from an ``ollama`` source: a second modelcache (test_download_sources.py's
upstream) behind test_pull_through_streaming.py's slow proxy, which hands the model layer over in about
four seconds and can lie about one blob's last byte. The server learns of the file from the
announcement the fetchd writes under ``tmp/downloads/inflight/`` (``downloads/inflight.py``).
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
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from test_download_sources import UPSTREAM_TOKEN, upstream  # noqa: F401
from test_downloads import Killable, allow, bearer, request_download
from test_pull_through import download_rows, make_pt_settings, upstream_manifest  # noqa: F401
from test_pull_through_streaming import SlowProxy, read_timed

pytestmark = [pytest.mark.registry, pytest.mark.e2e]


class Fetchd(Killable):
    """A real ``modelcache fetchd`` subprocess; its log is ``tmp_path/fetchd.log``."""

    def __init__(self, tmp_path: Path, conf: Path, dsn: str, data: Path, token: str) -> None:
        self.args = [sys.executable, "-m", "modelcache", "fetchd", "--config", str(conf), "--dsn", dsn,
                     "--data-dir", str(data)]
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")},
                    UPSTREAM_TOKEN: token}
        self.log = tmp_path / "fetchd.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while "downloads: up to" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            await asyncio.sleep(0.1)


@pytest.fixture
async def apart(upstream, make_pt_settings, start_server, db, dsn, tmp_path):  # noqa: F811
    """Our server (this process, no worker) and a fetchd beside it; (server, proxy, fetchd, layer, manifest)."""
    proxy = SlowProxy(upstream.url)
    await proxy.start()
    settings = make_pt_settings({"registry": ("ollama", proxy.url)})
    server = await start_server(settings)
    fetchd = Fetchd(tmp_path, tmp_path / "modelcache.toml", dsn, settings.data_dir, upstream.token)
    await fetchd.start()
    await allow(db, "registry")
    async with aiohttp.ClientSession() as http:
        manifest = await upstream_manifest(http, upstream, "meta/tinyllama", "1b")
    layer = max(json.loads(manifest)["layers"], key=lambda layer: layer["size"])
    assert layer["size"] == len(upstream.gguf_bytes)
    server.data_dir = settings.data_dir
    yield server, proxy, fetchd, layer
    fetchd.stop()
    await proxy.stop()


async def ask(http, server, operator: str) -> str:
    job = await request_download(http, server, operator, source="registry", reference="meta/tinyllama:1b",
                                 model="tinyllama", vendor="meta", version="1b")
    return job["id"]


async def asked_and_announced(http, server, layer: dict, make_token) -> tuple[URL, str]:
    """An operator asks for the download; returns the layer's blob URL and a node token once the server
    answers it (the fetchd has announced it)."""
    node, operator = await make_token("node"), await make_token("operator")
    url = server.make_url(f"/v1/blobs/{layer['digest']}")
    await ask(http, server, operator)
    await until_served(http, url, node)
    return url, node


async def until_served(http, url, node: str) -> float:
    """Seconds until the blob is answered (HEAD 200): the fetchd has announced it."""
    started = time.monotonic()
    while True:
        async with http.head(url, headers=bearer(node)) as r:
            if r.status == 200:
                return time.monotonic() - started
            assert r.status == 404
        assert time.monotonic() - started < 20, "the blob was never answered while it was fetched"
        await asyncio.sleep(0.05)


def state(dsn: str) -> str:
    return download_rows(dsn)[-1]["state"]


async def until_state(dsn: str, wanted: str) -> None:
    for _ in range(200):
        if state(dsn) == wanted:
            return
        await asyncio.sleep(0.1)
    assert state(dsn) == wanted


async def test_a_blob_fetchd_is_fetching_is_streamed_by_the_server(
        upstream, apart, http, dsn, make_token):  # noqa: F811
    server, _, _, layer = apart
    content = upstream.gguf_bytes
    node, operator = await make_token("node"), await make_token("operator")
    url = server.make_url(f"/v1/blobs/{layer['digest']}")
    async with http.head(url, headers=bearer(node)) as r:
        assert r.status == 404  # nothing yet
    await ask(http, server, operator)
    await until_served(http, url, node)

    asked = time.monotonic()
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200 and r.content_length == len(content)
        running = state(dsn)
        body, first = await read_timed(r, asked)
    took = time.monotonic() - asked
    assert running == "running"  # answered while the fetchd was still fetching it
    assert first < 1.0, f"first byte after {first:.2f}s"
    assert took >= 1.5, f"the whole body took {took:.2f}s: it was not fetched while streamed"
    assert body == content and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
    async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{layer['digest']}"),
                        headers={**bearer(node), "Range": "bytes=10-99"}) as r:
        assert r.status in (200, 206)  # in flight or committed by now: served either way
    await until_state(dsn, "completed")
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200 and await r.read() == content
    for _ in range(50):  # the announcements go with the job (just after its row says completed)
        if not (server.data_dir / "tmp" / "downloads" / "inflight").exists():
            break
        await asyncio.sleep(0.1)
    assert not (server.data_dir / "tmp" / "downloads" / "inflight").exists()


async def test_a_blob_whose_upstream_lies_is_cut_short_by_the_server_too(
        upstream, apart, http, dsn, make_token, caplog):  # noqa: F811
    server, proxy, _, layer = apart
    content = upstream.gguf_bytes
    proxy.lie_about = layer["digest"]
    url, node = await asked_and_announced(http, server, layer, make_token)
    got = bytearray()
    with caplog.at_level(logging.WARNING, logger="modelcache.server.blobs.inflight"):
        async with http.get(url, headers=bearer(node)) as r:
            assert r.status == 200 and r.content_length == len(content)
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
    assert 0 < len(got) < len(content)  # never the whole (wrong) body
    assert bytes(got) == content[:len(got)]  # the changed last byte was held back
    assert any("cut off" in m and layer["digest"] in m for m in caplog.messages), caplog.messages
    await until_state(dsn, "failed")
    async with http.head(url, headers=bearer(node)) as r:
        assert r.status == 404


async def test_a_killed_fetchd_ends_the_answer_short_and_then_404(
        upstream, apart, http, dsn, make_token, caplog):  # noqa: F811
    server, _, fetchd, layer = apart
    content = upstream.gguf_bytes
    url, node = await asked_and_announced(http, server, layer, make_token)
    got = bytearray()
    with caplog.at_level(logging.WARNING, logger="modelcache.server.blobs.inflight"):
        async with http.get(url, headers=bearer(node)) as r:
            assert r.status == 200
            got += await r.content.readany()
            fetchd.kill()  # mid-transfer: its announcement is left, its heartbeat stops
            killed = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    got += chunk
    assert time.monotonic() - killed < 10  # within the heartbeat's staleness (5 s) and a poll
    assert 0 < len(got) < len(content) and bytes(got) == content[:len(got)]
    assert any("has not announced progress" in m for m in caplog.messages), caplog.messages
    async with http.head(url, headers=bearer(node)) as r:
        assert r.status == 404  # a stale announcement is no longer in flight


# -- announcements a writer did not write as a fetchd does: the answer is cut short, never hung or whole ----


@pytest.fixture
async def announcer(start_server, make_settings, tmp_path):
    """Our server (no worker) and a hand-written announcement of a 3 MiB file: what a fetchd would
    write, then whatever a test writes over it. Yields (server, url, content, announce, partial)."""
    settings = make_settings()
    server = await start_server(settings)
    content = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    downloads = settings.data_dir / "tmp" / "downloads"
    (downloads / "inflight").mkdir(parents=True, exist_ok=True)
    partial = downloads / "11111111-1111-1111-1111-111111111111.partial"
    announcement = downloads / "inflight" / f"{digest.removeprefix('sha256:')}.json"

    def announce(**fields) -> None:
        state = {"job": "11111111-1111-1111-1111-111111111111", "digest": digest, "size": len(content),
                 "promoted": True, "path": str(partial), "available": 0, "generation": 0, "verified": False,
                 "pid": os.getpid(), "heartbeat": time.time(), **fields}
        tmp = announcement.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(announcement)

    server.data_dir = settings.data_dir
    yield server, server.make_url(f"/v1/blobs/{digest}"), content, announce, partial


async def read_until_cut(r, got: bytearray, bound: float = 8.0) -> None:
    """The rest of an answer, which must end short (a payload error) within ``bound`` seconds."""
    async def rest() -> None:
        async for chunk in r.content.iter_any():
            got.extend(chunk)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(rest(), bound)


async def test_an_announcement_of_impossible_numbers_is_not_in_flight(announcer, http, make_token):
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    partial.write_bytes(content[:1000])
    for fields in ({"size": float("inf")}, {"available": float("inf")}, {"heartbeat": float("nan")},
                   {"heartbeat": float("inf")}, {"size": 10**400}):
        announce(**{"available": 1000, **fields})
        for method in ("HEAD", "GET"):
            async with http.request(method, url, headers=bearer(node)) as r:
                assert r.status == 404, (fields, method, r.status)


@pytest.mark.parametrize("garbage", [{"heartbeat": "soon"}, {"available": float("inf")}, {"generation": [1]},
                                     {"job": "22222222-2222-2222-2222-222222222222"}])
async def test_an_announcement_turned_unreadable_mid_answer_cuts_it_short(announcer, http, make_token, garbage):
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    partial.write_bytes(content[:1 << 20])
    announce(available=1 << 20)
    got = bytearray()
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200 and r.content_length == len(content)
        while len(got) < 1 << 20:
            got += await asyncio.wait_for(r.content.readany(), 5)
        announce(**{"available": 1 << 20, **garbage})
        await read_until_cut(r, got)
    assert bytes(got) == content[:1 << 20]


@pytest.mark.parametrize("asked", [None, "bytes=100-2097151"])
@pytest.mark.parametrize("ending", ["announced", "committed"])
async def test_a_file_started_over_by_a_new_writer_is_cut_short_even_when_it_ends_verified(
        announcer, http, make_token, ending, asked):
    """A fetchd killed and started again (or a job retried) announces the same job at generation 0 again:
    a reader that had bytes of the old file must not get the new file's rest as one whole body (or range)."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    wrong = bytes(b ^ 0xFF for b in content[:1 << 20])
    partial.write_bytes(wrong)
    announce(available=1 << 20, pid=1)
    got = bytearray()
    length = len(content) if asked is None else 2097152 - 100
    async with http.get(url, headers={**bearer(node), **({"Range": asked} if asked else {})}) as r:
        assert r.status == (206 if asked else 200)
        while len(got) < (1 << 20) - (100 if asked else 0):
            got += await asyncio.wait_for(r.content.readany(), 5)
        with open(partial, "r+b") as f:  # the new writer starts over in place and gets the right file
            f.write(content)
        if ending == "announced":
            announce(available=len(content), verified=True, pid=2)
        else:  # committed, and the announcement gone, within one poll
            blob = server.data_dir / "blobs" / "sha256" / url.path.rsplit(":", 1)[1][:2] / url.path.rsplit(":", 1)[1]
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            (server.data_dir / "tmp" / "downloads" / "inflight" / f"{blob.name}.json").unlink()
        try:
            async for chunk in r.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            pass
    assert len(got) < length, "a whole body of bytes that are not the verified file's"


@pytest.mark.parametrize("asked", [None, "bytes=10-99", "bytes=-100"])
async def test_an_announced_file_that_stays_the_same_is_answered_whole(announcer, http, make_token, asked):
    """The check of what was sent against the verified file lets the right bytes through (whole, or a range)."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    partial.write_bytes(content[:1 << 20])
    announce(available=1 << 20)
    headers = {**bearer(node), **({"Range": asked} if asked else {})}
    want = {None: content, "bytes=10-99": content[10:100], "bytes=-100": content[-100:]}[asked]
    async with http.get(url, headers=headers) as r:
        assert r.status == (206 if asked else 200)
        body = asyncio.ensure_future(r.read())
        await asyncio.sleep(0.3)
        with open(partial, "ab") as f:
            f.write(content[1 << 20:])
        announce(available=len(content), verified=True)
        assert await asyncio.wait_for(body, 8) == want


async def test_an_empty_file_in_flight_is_not_answered_before_it_is_verified(announcer, http, make_token):
    """Its answer would be complete with its headers: a declared size of 0 is not streamed (the digest is
    not the empty file's: the declaration is wrong, and nothing can be held back)."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    partial.write_bytes(b"")
    announce(size=0, available=0)
    for method in ("HEAD", "GET"):
        async with http.request(method, url, headers=bearer(node)) as r:
            assert r.status == 404, (method, r.status)


async def test_an_answer_whose_partial_file_is_gone_is_cut_short_at_once(announcer, http, make_token):
    """Neither the partial file the announcement names nor the blob: the answer ends short (not left
    open, waiting for bytes that never come, until the keep-alive timer closes the connection)."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    announce(available=1 << 20)  # and no partial file at all
    got = bytearray()
    started = time.monotonic()
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200
        await read_until_cut(r, got, bound=12)
    assert got == b"" and time.monotonic() - started < 12


async def test_symlinks_in_the_downloads_folder_are_not_followed(announcer, http, make_token, tmp_path):
    """Only the fetchd writes there, and never a link: a partial file, or an announcement, that is a
    symbolic link (to a file the server may read) gives nothing of what it points at."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(content)
    partial.symlink_to(elsewhere)
    announce(available=1 << 20)
    got = bytearray()
    async with http.get(url, headers=bearer(node)) as r:
        if r.status == 200:
            await read_until_cut(r, got, bound=12)
    assert got == b""
    partial.unlink()
    partial.write_bytes(content[:1 << 20])
    announcement = server.data_dir / "tmp" / "downloads" / "inflight" / f"{url.path.rsplit(':', 1)[1]}.json"
    kept = tmp_path / "kept.json"
    announcement.replace(kept)
    announcement.symlink_to(kept)
    async with http.head(url, headers=bearer(node)) as r:
        assert r.status == 404


async def test_an_announcement_that_is_not_a_file_is_not_read(announcer, http, make_token):
    """A FIFO where an announcement goes: reading it would block a thread for good."""
    server, url, content, announce, partial = announcer
    node = await make_token("node")
    announcement = server.data_dir / "tmp" / "downloads" / "inflight" / f"{url.path.rsplit(':', 1)[1]}.json"
    os.mkfifo(announcement)
    try:
        async with asyncio.timeout(5):
            async with http.head(url, headers=bearer(node)) as r:
                assert r.status == 404
    finally:
        try:  # let a reader that blocked on it go
            os.close(os.open(announcement, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
