"""Downloads from the multi-file source kinds, each from a real upstream on loopback.

- ``modelcache``: a second ``modelcache serve`` process on its own database and data dir, holding a
  GGUF and a safetensors snapshot imported through the real import road;
- ``huggingface``: that same process's ``/hf`` mirror as the Hub endpoint, read by ``huggingface_hub``;
- ``ollama``: Debian's ``docker-registry`` (distribution) holding an Ollama model pushed with skopeo.

Never a mock of our own client: the upstreams are real servers, and a lying upstream is a real
one whose blob file was damaged on its disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from aiohttp import web

from conftest import gguf_bytes, safetensors_bytes
from modelcache.auth import Role, Subject
from modelcache.db import Database
from modelcache.imports import ImportRequest, import_path
from modelcache.store import BlobStore
from modelcache.tokens import create_token
from test_downloads import (RunProcess, allow, bearer, blob_files, free_port, make_download_settings,  # noqa: F401
                            request_download, wait_for, worker)
from test_hf_api import snapshot_files, write_snapshot
from test_hf_clients import Server
from test_oci_clients import DOCKER, OCI, ollama_models_dir

pytestmark = pytest.mark.registry

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
UPSTREAM_TOKEN = "MC_CENTRAL_TOKEN"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Upstream:
    """A second modelcache (its own database and data dir) in a ``modelcache serve`` process."""

    def __init__(self, server: Server, data_dir: Path, token: str, gguf: tuple, snapshot: tuple, dsn: str = "") -> None:
        self.server, self.data_dir, self.token, self.dsn = server, data_dir, token, dsn
        self.gguf_bytes, self.gguf = gguf  # the file's bytes, the ImportResult
        self.snapshot_files, self.snapshot = snapshot

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"


@pytest.fixture
async def upstream(make_database, tmp_path):
    dsn = make_database()
    data_dir = tmp_path / "central"
    store = BlobStore(data_dir)
    store.prepare()
    db = Database(dsn)
    await db.open()
    try:
        content = gguf_bytes(n_floats=4096)
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "tinyllama-q4.gguf").write_bytes(content)
        gguf = await import_path(db, store, ImportRequest.parse(
            tmp_path / "src" / "tinyllama-q4.gguf", "tinyllama", "1b", "meta", "gguf"), Subject.local())
        files = snapshot_files("acme/tiny:1")
        snap = await import_path(db, store, ImportRequest.parse(
            write_snapshot(tmp_path / "snapshot", files), "tiny", "1", "acme", "safetensors"), Subject.local())
        token, _ = await create_token(db, name="site-cache", role=Role("operator"), subject=Subject.local())
    finally:
        await db.close()
    server = await asyncio.to_thread(Server, dsn, data_dir, tmp_path / "central.log")
    yield Upstream(server, data_dir, token, (content, gguf), (files, snap), dsn)
    await asyncio.to_thread(server.stop)


def artifact_row(dsn: str, digest: str) -> tuple[dict, dict[str, tuple[str, int]]]:
    """The artifact registered with ``digest`` and its files (path -> digest, size), derived ones aside."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT a.id, a.artifact_type, a.source_uri, m.name, m.vendor, v.version "
                           "FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id "
                           "JOIN models m ON m.id = v.model_id WHERE a.sha256 = %s", (digest[7:],)).fetchone()
        assert row is not None, f"no artifact {digest}"
        files = conn.execute("SELECT path, blob_digest, size_bytes FROM artifact_files WHERE artifact_id = %s",
                             (row[0],)).fetchall()
    keys = ("id", "artifact_type", "source_uri", "model", "vendor", "version")
    # .ollama/ files are the /v2 manifests this cache derives itself at registration, not fetched ones
    return dict(zip(keys, row)), {p: (d, s) for p, d, s in files if not p.startswith(".ollama/")}


def stored(data_dir: Path, digest: str) -> bytes:
    hexd = digest.split(":")[1]
    return (data_dir / "blobs" / "sha256" / hexd[:2] / hexd).read_bytes()


async def download(http, server, admin, **body) -> dict:
    job = await request_download(http, server, admin, **body)
    return await wait_for(http, server, admin, job["id"], timeout=40)


def staging_left(data_dir: Path) -> list[Path]:
    root = data_dir / "tmp" / "downloads"
    return sorted(root.iterdir()) if root.exists() else []


# -- modelcache ------------------------------------------------------------------------------


async def test_a_site_cache_fills_from_a_central_one_by_digest_and_by_name(
        upstream, make_download_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    settings = make_download_settings({"central": ("modelcache", upstream.url)}, {"central": UPSTREAM_TOKEN})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "central")
    admin = await make_token("admin")

    # a GGUF by its digest, a safetensors snapshot by its name
    gguf = await download(http, server, admin, source="central", reference=str(upstream.gguf.digest),
                          model="tinyllama", vendor="meta", version="1b")
    snap = await download(http, server, admin, source="central", reference="acme/tiny:1", model="tiny",
                          vendor="acme", version="1")
    assert gguf["state"] == snap["state"] == "completed", (gguf, snap)
    assert gguf["digest"] == str(upstream.gguf.digest) and snap["digest"] == str(upstream.snapshot.digest)

    row, files = artifact_row(dsn, gguf["digest"])
    assert row["artifact_type"] == "gguf" and (row["vendor"], row["model"], row["version"]) == ("meta", "tinyllama", "1b")
    assert files == {"tinyllama-q4.gguf": (str(upstream.gguf.digest), len(upstream.gguf_bytes))}
    assert stored(settings.data_dir, gguf["digest"]) == upstream.gguf_bytes
    assert row["source_uri"] == f"{upstream.url}v1/artifacts/{upstream.gguf.digest}"

    row, files = artifact_row(dsn, snap["digest"])
    assert row["artifact_type"] == "safetensors"
    assert files == {p: (sha256(data), len(data)) for p, data in upstream.snapshot_files.items()}
    for path, data in upstream.snapshot_files.items():
        assert stored(settings.data_dir, files[path][0]) == data

    # the other way round: the GGUF by name, the snapshot by digest (the same artifacts: no-ops)
    again = [await download(http, server, admin, source="central", reference="meta/tinyllama:1b",
                            model="tinyllama", vendor="meta", version="1b"),
             await download(http, server, admin, source="central", reference=str(upstream.snapshot.digest),
                            model="tiny", vendor="acme", version="1")]
    assert [(j["state"], j["artifact_id"]) for j in again] == [("completed", gguf["artifact_id"]),
                                                               ("completed", snap["artifact_id"])]
    # served by this cache as by the central one
    async with http.get(server.make_url(f"/v1/blobs/{files['config.json'][0]}"), headers=bearer(admin)) as r:
        assert r.status == 200 and await r.read() == upstream.snapshot_files["config.json"]
    assert staging_left(settings.data_dir) == []  # each job's staging folder went with it


async def test_a_central_cache_serving_damaged_bytes_leaves_nothing(
        upstream, make_download_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    # damage one shard on the central cache's disk (as the owner it can be made writable again): it serves
    # the wrong bytes under the right digest
    shard = upstream.snapshot_files["model-00002-of-00002.safetensors"]
    path = upstream.data_dir / "blobs" / "sha256" / sha256(shard)[7:9] / sha256(shard)[7:]
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    settings = make_download_settings({"central": ("modelcache", upstream.url)}, {"central": UPSTREAM_TOKEN})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "central")
    admin = await make_token("admin")

    job = await download(http, server, admin, source="central", reference="acme/tiny:1", model="tiny",
                         vendor="acme", version="1")
    assert job["state"] == "failed", job
    assert "model-00002-of-00002.safetensors" in job["error"] and sha256(shard) in job["error"]
    assert sha256(bytes(damaged)) in job["error"]
    assert blob_files(settings.data_dir) == []  # not a blob kept, not even the files that were right
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM model_artifacts").fetchone()[0] == 0
    assert staging_left(settings.data_dir) == []


async def test_a_central_cache_declaring_a_wrong_artifact_digest_leaves_nothing(
        upstream, make_download_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    # every file is what the central cache says it is, but the artifact digest it declares is not the one
    # those files make: refused before any blob is committed, so nothing is left for the start-up sweep
    lie = sha256(b"not the manifest")
    with psycopg.connect(upstream.dsn) as conn:
        conn.execute("UPDATE model_artifacts SET sha256 = %s WHERE sha256 = %s",
                     (lie[7:], upstream.snapshot.digest.hex))
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    settings = make_download_settings({"central": ("modelcache", upstream.url)}, {"central": UPSTREAM_TOKEN})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "central")
    admin = await make_token("admin")

    job = await download(http, server, admin, source="central", reference="acme/tiny:1", model="tiny",
                         vendor="acme", version="1")
    assert job["state"] == "failed", job
    assert lie in job["error"] and str(upstream.snapshot.digest) in job["error"], job["error"]
    assert blob_files(settings.data_dir) == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM model_artifacts").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
    assert staging_left(settings.data_dir) == []


BLOB_GET = re.compile(r" GET /v1/blobs/(sha256:[0-9a-f]{64}) (\d{3}) .* range=(\S+) bytes=(\d+) ")


def blob_gets(log: Path) -> list[tuple[str, int, str, int]]:
    """The upstream's access-log lines of blob GETs: (digest, status, range, bytes sent)."""
    return [(m[1], int(m[2]), m[3], int(m[4])) for m in map(BLOB_GET.search, log.read_text().splitlines()) if m]


async def test_killing_run_mid_multi_file_download_resumes_from_disk(make_database, tmp_path, dsn, db, make_token,
                                                                      http):
    # the central cache holds a snapshot with one large shard; our `modelcache run` fetches it at 8 MiB/s
    # (downloads.max_bytes_per_second), the shard in 8 MiB parts, two at once, and is killed mid-shard
    central_dsn = make_database()
    central = tmp_path / "central"
    store = BlobStore(central)
    store.prepare()
    files = {"config.json": b'{"architectures": ["TinyForCausalLM"]}',
             "model-00001-of-00002.safetensors": safetensors_bytes({"a": ("F32", [64, 64])}),
             "model-00002-of-00002.safetensors": safetensors_bytes({"b": ("F32", [10, 1 << 20])})}  # 40 MiB
    big = sha256(files["model-00002-of-00002.safetensors"])
    total = sum(len(d) for d in files.values())
    cdb = Database(central_dsn)
    await cdb.open()
    try:
        snap = await import_path(cdb, store, ImportRequest.parse(write_snapshot(tmp_path / "snap", files), "big",
                                                                 "1", "acme", "safetensors"), Subject.local())
        central_token, _ = await create_token(cdb, name="site", role=Role("operator"), subject=Subject.local())
    finally:
        await cdb.close()
    upstream = await asyncio.to_thread(Server, central_dsn, central, tmp_path / "central.log")

    await allow(db, "central")
    token = await make_token("operator")
    port = free_port()
    conf = tmp_path / "run.toml"
    conf.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[sources.central]\nkind = "modelcache"\n'
                    f'url = "http://127.0.0.1:{upstream.port}/"\ntoken_env = "{UPSTREAM_TOKEN}"\n\n'
                    "[downloads]\npoll_seconds = 0.2\nmax_bytes_per_second = 8388608\n"
                    "part_threshold_bytes = 4194304\nparallel_parts = 2\n")
    data = tmp_path / "run-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    env[UPSTREAM_TOKEN] = central_token
    run = RunProcess(tmp_path, conf, dsn, data, port, http, token, env)
    try:
        await run.start()
        async with http.post(f"{run.base}/v1/downloads", headers=bearer(token), json={
                "source": "central", "reference": "acme/big:1", "model": "big", "vendor": "acme",
                "version": "1"}) as r:
            assert r.status == 202, await r.text()
            asked = await r.json()
        deadline = time.monotonic() + 30
        while (body := await run.download(asked["id"]))["bytes_done"] < total * 0.6:
            assert body["state"] in ("queued", "running") and time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
        run.kill()
        staging = data / "tmp" / "downloads" / asked["id"]
        verified = json.loads((staging / "verified.json").read_text())
        assert set(verified) == {"config.json", "model-00001-of-00002.safetensors"}  # the small files are in
        notes = [json.loads(n.read_text()) for n in (staging / "parts").glob("*.json")
                 if not n.name.endswith(".origin.json")]
        assert len(notes) == 1 and notes[0]["parts"], notes  # the shard in flight: some parts recorded done
        done_before = {start for start, _ in notes[0]["parts"]}
        await asyncio.sleep(1.0)  # the upstream writes its access log twice a second
        before = len(blob_gets(upstream.log))

        await run.start()
        body = await run.until_ended(asked["id"], timeout=40)
    finally:
        run.stop()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(upstream.stop)
    assert body["state"] == "completed" and body["digest"] == str(snap.digest), body
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM model_artifacts").fetchone()[0] == 1
    row, got = artifact_row(dsn, body["digest"])
    assert got == {p: (sha256(d), len(d)) for p, d in files.items()}
    assert [p for p in (data / "tmp").rglob("*") if p.is_file()] == []

    gets = blob_gets(upstream.log)
    after = gets[before:]
    for path, content in files.items():
        if sha256(content) != big:  # verified before the kill: never asked for again
            assert [g for g in gets if g[0] == sha256(content)] == [(sha256(content), 200, "-", len(content))]
    shard = [g for g in after if g[0] == big]
    assert shard and all(g[1] == 206 for g in shard), shard  # resumed by range, never the whole file again
    asked_from = {int(g[2].split("-")[0].removeprefix("bytes=")) for g in shard}
    assert not asked_from & done_before, (asked_from, done_before)  # parts recorded done are not fetched again
    assert sum(g[3] for g in gets) < 1.5 * total
    assert "resuming in parts" in (tmp_path / "run.log").read_text()


# -- huggingface -----------------------------------------------------------------------------


async def test_a_hub_repository_with_include_patterns(
        upstream, make_download_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    hub = f"http://127.0.0.1:{upstream.server.port}/hf"
    settings = make_download_settings({"hub": ("huggingface", hub)}, {"hub": UPSTREAM_TOKEN})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "hub")
    admin = await make_token("admin")

    job = await download(http, server, admin, source="hub", reference="acme/tiny@1?include=*.safetensors,*.json",
                         model="tiny", vendor="acme", version="1")
    assert job["state"] == "completed", job
    wanted = {p: d for p, d in upstream.snapshot_files.items()}  # tokenizer/tokenizer.json matches *.json too
    row, files = artifact_row(dsn, job["digest"])
    assert row["artifact_type"] == "safetensors"
    assert files == {p: (sha256(data), len(data)) for p, data in wanted.items()}
    assert job["digest"] == str(upstream.snapshot.digest)  # the same files at the same paths: the same artifact

    # without the shards: another artifact, only what the patterns take
    job = await download(http, server, admin, source="hub",
                         reference="acme/tiny@1?include=model-00001-of-00002.safetensors,config.json",
                         model="tiny", vendor="acme", version="1-shard1")
    assert job["state"] == "completed", job
    _, files = artifact_row(dsn, job["digest"])
    assert sorted(files) == ["config.json", "model-00001-of-00002.safetensors"]


async def test_hub_metadata_redirected_off_the_source_is_refused(
        make_download_settings, start_server, worker, db, http, make_token):
    # a Hub endpoint whose API redirects: to another host (allowed as a URL prefix, so bytes could come
    # from it), and to the cloud metadata address; metadata is read from the configured source only
    other_hits: list[str] = []

    async def other(request: web.Request) -> web.Response:
        other_hits.append(request.path)
        return web.json_response({"sha": "0" * 40, "siblings": []})

    other_runner = web.AppRunner(web.Application())
    other_runner.app.router.add_get("/{tail:.*}", other)
    await other_runner.setup()
    other_port = free_port()
    await web.TCPSite(other_runner, "127.0.0.1", other_port).start()

    async def hub(request: web.Request) -> web.Response:
        target = (f"http://127.0.0.1:{other_port}" if "/acme/other/" in request.path
                  else "http://169.254.169.254") + request.path_qs
        raise web.HTTPFound(target)

    hub_runner = web.AppRunner(web.Application())
    hub_runner.app.router.add_get("/{tail:.*}", hub)
    await hub_runner.setup()
    hub_port = free_port()
    await web.TCPSite(hub_runner, "127.0.0.1", hub_port).start()
    try:
        settings = make_download_settings({"hub": ("huggingface", f"http://127.0.0.1:{hub_port}")})
        server = await start_server(settings)
        await worker(settings)
        await allow(db, "hub", f"http://127.0.0.1:{other_port}/")
        admin = await make_token("admin")
        for repo in ("acme/other", "acme/metadata"):
            job = await download(http, server, admin, source="hub", reference=f"{repo}@main", model="tiny",
                                 vendor="acme", version=repo.split("/")[1])
            assert job["state"] == "failed", job
            assert "download policy redirect" in job["error"] and "metadata is read from" in job["error"], job
        assert other_hits == []
    finally:
        await hub_runner.cleanup()
        await other_runner.cleanup()


# -- ollama ------------------------------------------------------------------------------------


class Registry:
    """Debian's docker-registry (distribution) on a free 127.0.0.1 port, storage in a temp dir."""

    def __init__(self, workdir: Path, storage: Path | None = None, auth: str = "") -> None:
        """``storage``: another registry's (default: its own); ``auth``: an ``auth:`` section, YAML."""
        self.port = free_port()
        workdir.mkdir()
        (workdir / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {storage or workdir / 'storage'}\n  delete:\n    enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n" + auth)
        self._log = open(workdir / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(workdir / "config.yml")], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        import socket
        while True:
            assert self.proc.poll() is None, (workdir / "registry.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "docker-registry did not listen within 15s"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def registry(tmp_path):
    if REGISTRY is None:
        pytest.skip("Debian's docker-registry is not installed (apt-get install docker-registry)")
    if SKOPEO is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    server = Registry(tmp_path / "registry")
    yield server
    server.stop()


def push_ollama_model(registry: Registry, tmp_path: Path) -> tuple[bytes, dict[str, bytes]]:
    """An Ollama model (as ``ollama pull`` leaves it) in the registry: its blobs pushed with skopeo, its
    Docker v2 manifest PUT as-is (skopeo refuses a Docker v2 manifest with Ollama's layer types, and
    pushes the OCI form, which distribution does not serve to a Docker-v2-only Accept)."""
    layers = [("application/vnd.ollama.image.model", gguf_bytes(n_floats=4096)),
              ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
              ("application/vnd.ollama.image.params", b'{"stop":["<|eot|>"]}\n')]
    manifest, blobs = ollama_models_dir(tmp_path / "ollama", "registry.ollama.ai", "library", "tiny", "1", layers)
    layout = tmp_path / "layout"  # skopeo's dir: transport: manifest.json, version, and each blob by its hex
    layout.mkdir()
    oci = json.loads(manifest)
    oci["mediaType"] = OCI
    (layout / "manifest.json").write_bytes(json.dumps(oci).encode())
    (layout / "version").write_text("Directory Transport Version: 1.1\n")
    for digest, data in blobs.items():
        (layout / digest[7:]).write_bytes(data)
    done = subprocess.run([SKOPEO, "copy", "--preserve-digests", "--dest-tls-verify=false", f"dir:{layout}",
                           f"docker://127.0.0.1:{registry.port}/library/tiny:oci"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    put = urllib.request.Request(f"http://127.0.0.1:{registry.port}/v2/library/tiny/manifests/1", data=manifest,
                                 method="PUT", headers={"Content-Type": DOCKER})
    with urllib.request.urlopen(put, timeout=10) as r:
        assert r.status == 201
    return manifest, blobs


async def test_an_ollama_model_from_a_registry_is_served_byte_for_byte(
        registry, tmp_path, make_download_settings, start_server, worker, db, dsn, http, make_token):
    manifest, blobs = await asyncio.to_thread(push_ollama_model, registry, tmp_path)
    async with http.get(f"http://127.0.0.1:{registry.port}/v2/library/tiny/manifests/1",
                        headers={"Accept": DOCKER}) as r:
        assert r.status == 200 and await r.read() == manifest  # the registry holds it as pushed
    settings = make_download_settings({"registry": ("ollama", f"http://127.0.0.1:{registry.port}")})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "registry")
    admin = await make_token("admin")

    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    await assert_pulled_as_ollama(job, manifest, blobs, http, server, await make_token("node"), dsn, settings)


async def assert_pulled_as_ollama(job: dict, manifest: bytes, blobs: dict[str, bytes], http, server, node: str,
                                  dsn: str, settings) -> None:
    """A completed download of ``tiny`` is an ``ollama`` artifact holding the upstream's manifest and blobs,
    and ``ollama pull`` of ``library/tiny:<version>`` from us gets them byte for byte."""
    assert job["state"] == "completed", job
    assert job["digest"] == sha256(manifest)
    row, files = artifact_row(dsn, job["digest"])
    assert row["artifact_type"] == "ollama"
    assert files == {"manifest": (sha256(manifest), len(manifest)),
                     **{f"blobs/sha256-{d[7:]}": (d, len(data)) for d, data in blobs.items()}}
    # what ollama pull asks of us: the manifest (Docker v2 only) and every blob, byte for byte
    async with http.get(server.make_url(f"/v2/library/tiny/manifests/{job['version']}"),
                        headers={**bearer(node), "Accept": DOCKER}) as r:
        assert r.status == 200, await r.text()
        assert await r.read() == manifest
    for digest, data in blobs.items():
        async with http.get(server.make_url(f"/v2/library/tiny/blobs/{digest}"), headers=bearer(node)) as r:
            assert r.status == 200 and await r.read() == data
    assert staging_left(settings.data_dir) == []


async def test_an_ollama_reference_is_checked_when_asked(registry, make_download_settings, start_server, db, http,
                                                       make_token):
    settings = make_download_settings({"registry": ("ollama", f"http://127.0.0.1:{registry.port}")})
    server = await start_server(settings)
    await allow(db, "registry")
    admin = await make_token("admin")
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(admin),
                         json={"source": "registry", "reference": "../etc:1", "model": "x", "version": "1"}) as r:
        assert r.status == 400
        assert "[namespace/]model[:tag]" in (await r.json())["detail"]
