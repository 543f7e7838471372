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
import shutil
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from conftest import gguf_bytes
from modelcache import config
from modelcache.auth import Role, Subject
from modelcache.db import Database
from modelcache.imports import ImportRequest, import_path
from modelcache.store import BlobStore
from modelcache.tokens import create_token
from test_downloads import allow, bearer, blob_files, free_port, request_download, wait_for, worker  # noqa: F401
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

    def __init__(self, server: Server, data_dir: Path, token: str, gguf: tuple, snapshot: tuple) -> None:
        self.server, self.data_dir, self.token = server, data_dir, token
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
    yield Upstream(server, data_dir, token, (content, gguf), (files, snap))
    await asyncio.to_thread(server.stop)


@pytest.fixture
def make_source_settings(tmp_path, dsn):
    def make(sources: dict[str, tuple[str, str]], tokens: dict[str, str] | None = None) -> config.Settings:
        lines = []
        for sid, (kind, url) in sources.items():
            lines += [f"[sources.{sid}]", f'kind = "{kind}"', f'url = "{url}"']
            if tokens and sid in tokens:
                lines.append(f'token_env = "{tokens[sid]}"')
            lines.append("")
        lines += ["[downloads]", "poll_seconds = 0.2", "read_timeout = 5"]
        path = tmp_path / "modelcache.toml"
        path.write_text("\n".join(lines) + "\n")
        return config.load(path, env={}, overrides={"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn})

    return make


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
        upstream, make_source_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    settings = make_source_settings({"central": ("modelcache", upstream.url)}, {"central": UPSTREAM_TOKEN})
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
        upstream, make_source_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    # damage one shard on the central cache's disk (as the owner it can be made writable again): it serves
    # the wrong bytes under the right digest
    shard = upstream.snapshot_files["model-00002-of-00002.safetensors"]
    path = upstream.data_dir / "blobs" / "sha256" / sha256(shard)[7:9] / sha256(shard)[7:]
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    settings = make_source_settings({"central": ("modelcache", upstream.url)}, {"central": UPSTREAM_TOKEN})
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


# -- huggingface -----------------------------------------------------------------------------


async def test_a_hub_repository_with_include_patterns(
        upstream, make_source_settings, start_server, worker, db, dsn, http, make_token, monkeypatch):
    monkeypatch.setenv(UPSTREAM_TOKEN, upstream.token)
    hub = f"http://127.0.0.1:{upstream.server.port}/hf"
    settings = make_source_settings({"hub": ("huggingface", hub)}, {"hub": UPSTREAM_TOKEN})
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


# -- ollama ------------------------------------------------------------------------------------


class Registry:
    """Debian's docker-registry (distribution) on a free 127.0.0.1 port, storage in a temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        workdir.mkdir()
        (workdir / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {workdir / 'storage'}\n  delete:\n    enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n")
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
        registry, tmp_path, make_source_settings, start_server, worker, db, dsn, http, make_token):
    manifest, blobs = await asyncio.to_thread(push_ollama_model, registry, tmp_path)
    async with http.get(f"http://127.0.0.1:{registry.port}/v2/library/tiny/manifests/1",
                        headers={"Accept": DOCKER}) as r:
        assert r.status == 200 and await r.read() == manifest  # the registry holds it as pushed
    settings = make_source_settings({"registry": ("ollama", f"http://127.0.0.1:{registry.port}")})
    server = await start_server(settings)
    await worker(settings)
    await allow(db, "registry")
    admin = await make_token("admin")

    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    assert job["state"] == "completed", job
    assert job["digest"] == sha256(manifest)
    row, files = artifact_row(dsn, job["digest"])
    assert row["artifact_type"] == "ollama"
    assert files == {"manifest": (sha256(manifest), len(manifest)),
                     **{f"blobs/sha256-{d[7:]}": (d, len(data)) for d, data in blobs.items()}}

    # what ollama pull asks of us: the manifest (Docker v2 only) and every blob, byte for byte
    node = await make_token("node")
    async with http.get(server.make_url("/v2/library/tiny/manifests/1"),
                        headers={**bearer(node), "Accept": DOCKER}) as r:
        assert r.status == 200, await r.text()
        assert await r.read() == manifest
    for digest, data in blobs.items():
        async with http.get(server.make_url(f"/v2/library/tiny/blobs/{digest}"), headers=bearer(node)) as r:
            assert r.status == 200 and await r.read() == data
    assert staging_left(settings.data_dir) == []


async def test_an_ollama_reference_is_checked_when_asked(registry, make_source_settings, start_server, db, http,
                                                       make_token):
    settings = make_source_settings({"registry": ("ollama", f"http://127.0.0.1:{registry.port}")})
    server = await start_server(settings)
    await allow(db, "registry")
    admin = await make_token("admin")
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(admin),
                         json={"source": "registry", "reference": "../etc:1", "model": "x", "version": "1"}) as r:
        assert r.status == 400
        assert "[namespace/]model[:tag]" in (await r.json())["detail"]
