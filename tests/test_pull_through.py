"""Pull-through: a /v2 or /hf miss becomes a download from an upstream, then is answered from the cache.

The upstream is a second modelcache (``modelcache serve`` in its own process, database and data
dir, as in test_download_sources.py) holding a GGUF, served as an Ollama model on its ``/v2``, and a
safetensors snapshot on its ``/hf``. Our cache's sources point at it; downloads run in a real worker;
the clients are what ``ollama pull`` asks (its Accept, manifest then blobs) and the real, unmodified
``huggingface_hub.snapshot_download`` in its own process with ``HF_ENDPOINT`` at our ``/hf``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time

import psycopg
import pytest

from modelcache import config, preferences
from modelcache.auth import Subject
from modelcache.db import Database
from modelcache.imports import ImportRequest, import_path
from modelcache.store import BlobStore
from conftest import gguf_bytes
from test_download_sources import UPSTREAM_TOKEN, upstream  # noqa: F401
from test_download_transfer import RefusingProxy
from test_downloads import allow, audit_rows, bearer, worker  # noqa: F401
from test_hf_clients import run, sha256s
from test_oci_clients import DOCKER

pytestmark = pytest.mark.registry

WAIT = 20  # downloads.pull_through_wait_seconds: the upstream is on loopback, a download takes a second or two

SNAPSHOT = r'''
import hashlib, json, sys
from pathlib import Path
from huggingface_hub import snapshot_download

folder = Path(snapshot_download(sys.argv[1]))
print(json.dumps({p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(folder.rglob("*")) if p.is_file()}))
'''


@pytest.fixture
def make_pt_settings(tmp_path, dsn):
    """Our cache's settings: sources (id -> kind, url; each with the upstream's token) and fast retries."""

    def make(sources: dict[str, tuple[str, str]], **downloads) -> config.Settings:
        lines = []
        for sid, (kind, url) in sources.items():
            lines += [f"[sources.{sid}]", f'kind = "{kind}"', f'url = "{url}"', f'token_env = "{UPSTREAM_TOKEN}"', ""]
        downloads = {"poll_seconds": 0.2, "read_timeout": 5, "retries": 1, "retry_seconds": 0.1,
                     "pull_through_wait_seconds": WAIT, **downloads}
        lines += ["[downloads]", *(f"{k} = {v}" for k, v in downloads.items())]
        path = tmp_path / "modelcache.toml"
        path.write_text("\n".join(lines) + "\n")
        return config.load(path, env={}, overrides={"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn})

    return make


@pytest.fixture
async def cache(upstream, make_pt_settings, start_server, worker, db, monkeypatch):  # noqa: F811
    """Our cache with sources at the upstream (/v2 as ollama, / as modelcache, /hf as huggingface) and a worker.

    ``make(first_v2_source, approval=, pull_through=)``: allowed_sources lists the one to use for /v2 first."""
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)

    async def make(v2: str = "registry", approval: bool = False, pull_through: bool = True):
        settings = make_pt_settings({"central": ("modelcache", upstream.url), "registry": ("ollama", upstream.url),
                                     "hub": ("huggingface", upstream.url + "hf")})
        server = await start_server(settings)
        await worker(settings)
        await allow(db, v2, "hub", *({"central", "registry"} - {v2}), approval=approval)
        await preferences.set_preference(db, "models.download.pull_through", pull_through, Subject.local())
        return server

    return make


def download_rows(dsn: str) -> list[dict]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT id, source, reference, model_name, model_vendor, version, state, requested_by, "
                           "error FROM model_downloads ORDER BY created_at")
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


async def upstream_manifest(http, upstream, name: str, tag: str) -> bytes:  # noqa: F811
    async with http.get(f"{upstream.url}v2/{name}/manifests/{tag}",
                        headers={**bearer(upstream.token), "Accept": DOCKER}) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def ollama_pull(http, server, token: str, name: str, tag: str) -> tuple[int, bytes | dict]:
    """What ``ollama pull`` asks: the manifest (Docker v2 only), then every blob it names. (status, manifest
    bytes or the error body)."""
    async with http.get(server.make_url(f"/v2/{name}/manifests/{tag}"), headers={**bearer(token), "Accept": DOCKER}) as r:
        if r.status != 200:
            return r.status, await r.json()
        manifest = await r.read()
    doc = json.loads(manifest)
    for layer in [doc["config"], *doc["layers"]]:
        async with http.get(server.make_url(f"/v2/{name}/blobs/{layer['digest']}"), headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
            assert "sha256:" + hashlib.sha256(await r.read()).hexdigest() == layer["digest"]
    return 200, manifest


# -- (a) ollama pull through /v2, then the upstream goes away ---------------------------------


async def test_an_ollama_pull_misses_fetches_and_is_answered_within_the_wait_then_served_with_the_upstream_down(
        upstream, cache, http, dsn, make_token):  # noqa: F811
    server = await cache("registry")
    node = await make_token("node", name="node-a")
    wanted = await upstream_manifest(http, upstream, "meta/tinyllama", "1b")

    started = time.monotonic()
    status, manifest = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    assert status == 200, manifest
    assert manifest == wanted  # the upstream's /v2 manifest, byte for byte
    assert time.monotonic() - started < WAIT
    # the blobs streamed while they were fetched (test_pull_through_streaming.py): the import may still run
    for _ in range(100):
        if download_rows(dsn)[0]["state"] != "running":
            break
        await asyncio.sleep(0.1)
    [row] = download_rows(dsn)
    assert (row["source"], row["reference"], row["model_vendor"], row["model_name"], row["version"], row["state"]) \
        == ("registry", "meta/tinyllama:1b", "meta", "tinyllama", "1b", "completed")
    assert row["requested_by"] == "token:node-a"  # made by the subject that missed
    [(decision, outcome, _, details)] = audit_rows(dsn, "model_download.request")
    assert (decision, outcome, details["pull_through"]) == ("allow", "queued", True)

    # the upstream goes away: what is cached is served as before; a miss is answered at once, saying why
    await asyncio.to_thread(upstream.server.stop)
    status, again = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    assert (status, again) == (200, wanted)
    started = time.monotonic()
    async with http.get(server.make_url("/v2/meta/other/manifests/1"), headers={**bearer(node), "Accept": DOCKER}) as r:
        body = await r.json()
        assert r.status == 503, body
    assert time.monotonic() - started < 10
    failed = download_rows(dsn)[-1]
    assert failed["state"] == "failed" and failed["reference"] == "meta/other:1"
    assert f"download {failed['id']}" in body["errors"][0]["detail"], body
    # asked again at once: the same failed download answers it, no second request to a dead upstream
    started = time.monotonic()
    async with http.get(server.make_url("/v2/meta/other/manifests/1"), headers={**bearer(node), "Accept": DOCKER}) as r:
        assert r.status == 503 and f"download {failed['id']}" in (await r.json())["errors"][0]["detail"]
    assert time.monotonic() - started < 2
    assert len(download_rows(dsn)) == 2


# -- (b) snapshot_download through /hf ----------------------------------------------------------


async def test_snapshot_download_through_hf_endpoint_fetches_the_repo_then_it_is_served_with_the_upstream_down(
        upstream, cache, http, dsn, make_token, tmp_path):  # noqa: F811
    server = await cache()
    node = await make_token("node", name="node-hf")
    script = tmp_path / "snapshot.py"
    script.write_text(SNAPSHOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=str(server.make_url("/hf")), HF_TOKEN=node, HF_HOME=str(tmp_path / "hf-home"),
               NO_PROXY="127.0.0.1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")

    done = await run([sys.executable, str(script), "acme/tiny"], env)
    assert json.loads(done.stdout) == sha256s(upstream.snapshot_files)
    [row] = download_rows(dsn)
    assert (row["source"], row["reference"], row["model_vendor"], row["model_name"], row["version"], row["state"],
            row["requested_by"]) == ("hub", "acme/tiny@main", "acme", "tiny", "main", "completed", "token:node-hf")

    # the upstream goes away: info, tree and files are still answered; a miss is told why, at once
    await asyncio.to_thread(upstream.server.stop)
    async with http.get(server.make_url("/hf/api/models/acme/tiny"), headers=bearer(node)) as r:
        assert r.status == 200
        commit = (await r.json())["sha"]
    async with http.get(server.make_url(f"/hf/api/models/acme/tiny/tree/{commit}?recursive=true"),
                        headers=bearer(node)) as r:
        assert r.status == 200
        assert {e["path"] for e in await r.json() if e["type"] == "file"} == set(upstream.snapshot_files)
    async with http.get(server.make_url("/hf/acme/tiny/resolve/main/config.json"), headers=bearer(node)) as r:
        assert r.status == 200 and await r.read() == upstream.snapshot_files["config.json"]
    started = time.monotonic()
    async with http.get(server.make_url("/hf/api/models/acme/other"), headers=bearer(node)) as r:
        assert r.status == 503, await r.text()
        assert "download " in r.headers["X-Error-Message"] and "failed" in r.headers["X-Error-Message"]
    assert time.monotonic() - started < 10


# -- (c) with approval required --------------------------------------------------------------


async def test_with_approval_the_miss_names_the_download_and_the_pull_after_approval_succeeds(
        upstream, cache, http, dsn, make_token):  # noqa: F811
    server = await cache("registry", approval=True)
    node = await make_token("node", name="node-c")
    admin = await make_token("admin")

    status, body = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    [row] = download_rows(dsn)
    assert row["state"] == "pending_approval" and row["requested_by"] == "token:node-c"
    assert status == 404
    detail = body["errors"][0]["detail"]
    assert f"awaiting an admin's approval" in detail and str(row["id"]) in detail, detail
    async with http.get(server.make_url("/hf/api/models/acme/tiny"), headers=bearer(node)) as r:  # /hf says so too
        assert r.status == 404 and r.headers["X-Error-Code"] == "RepoNotFound"
        hub_row = download_rows(dsn)[-1]
        assert hub_row["source"] == "hub" and hub_row["state"] == "pending_approval"
        assert f"download {hub_row['id']} " in r.headers["X-Error-Message"]
        assert "awaiting an admin's approval" in r.headers["X-Error-Message"]
    # asked again: the same pending download, not another
    status, body = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    assert status == 404 and str(row["id"]) in body["errors"][0]["detail"]
    assert len(download_rows(dsn)) == 2

    async with http.post(server.make_url(f"/v1/downloads/{row['id']}/approve"), headers=bearer(admin)) as r:
        assert r.status == 200, await r.text()
    status, manifest = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    assert (status, manifest) == (200, await upstream_manifest(http, upstream, "meta/tinyllama", "1b"))
    assert len(download_rows(dsn)) == 2


# -- (d) concurrent misses --------------------------------------------------------------------


async def test_ten_concurrent_misses_make_one_download_and_are_all_answered(
        upstream, cache, http, dsn, make_token):  # noqa: F811
    server = await cache("central")  # the modelcache kind: the upstream's GGUF by its name, through /v1
    node = await make_token("node")

    answers = await asyncio.gather(*(ollama_pull(http, server, node, "meta/tinyllama", "1b") for _ in range(10)))
    assert [status for status, _ in answers] == [200] * 10, answers
    assert len({manifest for _, manifest in answers}) == 1
    [row] = download_rows(dsn)
    assert (row["source"], row["reference"], row["state"]) == ("central", "meta/tinyllama:1b", "completed")
    assert len(audit_rows(dsn, "model_download.request")) == 1
    with psycopg.connect(dsn) as conn:  # the GGUF as the upstream holds it, its Ollama manifest derived here
        assert conn.execute("SELECT artifact_type, sha256 FROM model_artifacts").fetchall() == [
            ("gguf", upstream.gguf.digest.hex)]


# -- (e) off --------------------------------------------------------------------------------------


async def test_with_pull_through_off_a_miss_is_a_plain_404_and_asks_nothing(upstream, cache, http, dsn, make_token):  # noqa: F811
    server = await cache(pull_through=False)
    node = await make_token("node")
    status, body = await ollama_pull(http, server, node, "meta/tinyllama", "1b")
    assert status == 404 and body["errors"][0]["code"] == "NAME_UNKNOWN"
    assert "download" not in body["errors"][0]["detail"]
    async with http.get(server.make_url("/hf/acme/tiny/resolve/main/config.json"), headers=bearer(node)) as r:
        assert r.status == 404 and r.headers["X-Error-Code"] == "RepoNotFound"
        assert "download" not in r.headers["X-Error-Message"]
    assert download_rows(dsn) == []
    assert audit_rows(dsn, "model_download.request") == []


# -- (f) the upstream rate-limits (429 with Retry-After) ----------------------------------------------


async def test_while_the_upstream_answers_429_what_is_cached_is_served_a_miss_hears_503_at_once_then_completes(
        upstream, make_pt_settings, start_server, worker, db, http, dsn, make_token, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    # a second tag in the upstream, asked for only while it rate-limits
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "tinyllama-2b.gguf").write_bytes(gguf_bytes(n_floats=2048))
    up_db = Database(upstream.dsn)
    await up_db.open()
    try:
        await import_path(up_db, BlobStore(upstream.data_dir), ImportRequest.parse(
            tmp_path / "src2" / "tinyllama-2b.gguf", "tinyllama", "2b", "meta", "gguf"), Subject.local())
    finally:
        await up_db.close()
    for _ in range(100):  # the upstream's index follows the import it heard of
        async with http.get(f"{upstream.url}v2/meta/tinyllama/manifests/2b",
                            headers={**bearer(upstream.token), "Accept": DOCKER}) as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    wanted_2b = await upstream_manifest(http, upstream, "meta/tinyllama", "2b")

    # a real TCP proxy in front of the upstream: passes everything until told to answer 429 (Retry-After: 1)
    proxy = RefusingProxy(upstream.server.port, refusals=0, retry_after="1")
    url = await proxy.start()
    try:
        # retries enough to outlast the rate limit (20 x Retry-After 1 s)
        settings = make_pt_settings({"registry": ("ollama", url), "hub": ("huggingface", url + "hf")}, retries=20)
        server = await start_server(settings)
        await worker(settings)
        await allow(db, "registry", "hub")
        await preferences.set_preference(db, "models.download.pull_through", True, Subject.local())
        node = await make_token("node", name="node-429")

        # filled while the upstream answers: an Ollama model and a Hub snapshot
        wanted = await upstream_manifest(http, upstream, "meta/tinyllama", "1b")
        assert await ollama_pull(http, server, node, "meta/tinyllama", "1b") == (200, wanted)
        async with http.get(server.make_url("/hf/api/models/acme/tiny"), headers=bearer(node)) as r:
            assert r.status == 200, await r.text()
            commit = (await r.json())["sha"]
        for _ in range(100):
            if all(row["state"] == "completed" for row in download_rows(dsn)):
                break
            await asyncio.sleep(0.1)
        assert [row["state"] for row in download_rows(dsn)] == ["completed", "completed"]

        proxy.refusals = 10 ** 9  # from now on every connection hears 429 Too Many Requests, Retry-After: 1
        refused_from = proxy.connections

        # (a) what is cached is served: manifest and blobs, the Hub's revision, tree and files
        assert await ollama_pull(http, server, node, "meta/tinyllama", "1b") == (200, wanted)
        for path in ("/hf/api/models/acme/tiny/revision/main", f"/hf/api/models/acme/tiny/tree/{commit}"):
            async with http.get(server.make_url(path), headers=bearer(node)) as r:
                assert r.status == 200, (path, await r.text())
        async with http.get(server.make_url("/hf/acme/tiny/resolve/main/config.json"), headers=bearer(node)) as r:
            assert r.status == 200 and await r.read() == upstream.snapshot_files["config.json"]
        assert proxy.connections == refused_from  # none of it asked the upstream

        # (b) a miss is answered 503 at once (not after the wait), naming its download and the 429
        started = time.monotonic()
        async with http.get(server.make_url("/v2/meta/tinyllama/manifests/2b"),
                            headers={**bearer(node), "Accept": DOCKER}) as r:
            body = await r.json()
            assert r.status == 503, body
        assert time.monotonic() - started < 5
        row = download_rows(dsn)[-1]
        assert (row["reference"], row["state"]) == ("meta/tinyllama:2b", "running")
        detail = body["errors"][0]["detail"]
        assert f"download {row['id']}" in detail and "429" in detail, detail
        assert "429" in row["error"] and proxy.connections > refused_from

        # (c) the upstream answers again: the same download completes, the next pull is served
        proxy.refusals = proxy.connections
        for _ in range(150):
            if download_rows(dsn)[-1]["state"] != "running":
                break
            await asyncio.sleep(0.1)
        done = download_rows(dsn)[-1]
        assert (done["id"], done["state"], done["error"]) == (row["id"], "completed", None)
        assert await ollama_pull(http, server, node, "meta/tinyllama", "2b") == (200, wanted_2b)
        rows = download_rows(dsn)  # a pull in the instant before the index holds 2b maps to its download
        assert [r["reference"] for r in rows] == ["meta/tinyllama:1b", "acme/tiny@main", "meta/tinyllama:2b"]
        assert all(r["state"] == "completed" for r in rows) and rows[2]["id"] == row["id"], rows
    finally:
        await proxy.stop()
