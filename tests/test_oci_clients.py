"""Real clients against /v2/: Debian's skopeo, and Ollama's download algorithm replayed step by step.

Ollama itself cannot be installed here, so :func:`ollama_pull` does what its
``server/images.go`` (PullModel) and ``server/download.go`` (downloadBlob) do
in v0.33: the manifest with ``Accept: application/vnd.docker.distribution.manifest.v2+json``
only; per blob a HEAD for the size, one GET without Range whose ``Location``
it keeps (a 200 without one fails with "http: no Location header in
response"), then the parts as ranged GETs of that URL *without*
Authorization, the bodies written at their offsets whatever the status; at
the end a sha256 of every blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psutil
import psycopg
import pytest
from aiohttp import ClientSession, ClientTimeout

from conftest import run_cli
from modelcache.server.keys import CATALOG
from modelcache.syncd.daemon import SyncDaemon
from conftest import gguf_bytes

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (apt-get install skopeo)")

# Ollama's constants (server/download.go)
NUM_PARTS = 16
MIN_PART = 100_000_000
MAX_PART = 1_000_000_000


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class NoLocation(Exception):
    """Go's http.ErrNoLocation, which ollama pull reports as 'http: no Location header in response'."""


async def ollama_pull(base: str, name: str, tag: str, models: Path, token: str | None = None,
                      min_part: int = MIN_PART) -> dict:
    """Replay ``ollama pull --insecure HOST/NAME:TAG`` into the models dir ``models``; returns the manifest.

    ``token`` stands for registry options carrying a token (Ollama sends it as
    Bearer on the manifest, the HEAD and the Location GET, never on the parts).
    ``min_part`` scales the part size down so a small test blob is fetched in
    16 parts, as a blob of 1.6 GB or more is.
    """
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with ClientSession() as registry, ClientSession() as default_client:
        async with registry.get(f"{base}/v2/{name}/manifests/{tag}", headers={**auth, "Accept": DOCKER}) as r:
            assert r.status == 200, await r.text()
            raw = await r.read()
        manifest = json.loads(raw)
        layers = [*manifest["layers"], manifest["config"]]
        for layer in layers:
            await _download_blob(registry, default_client, f"{base}/v2/{name}/blobs/{layer['digest']}", auth,
                                 models / "blobs" / layer["digest"].replace(":", "-"), min_part)
        for layer in layers:  # "verifying sha256 digest"
            data = (models / "blobs" / layer["digest"].replace(":", "-")).read_bytes()
            assert sha256(data) == layer["digest"], f"digest mismatch, file must be downloaded again: {layer}"
        host = base.split("://", 1)[1]
        target = models / "manifests" / host / name / tag
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    return manifest


async def _download_blob(registry: ClientSession, default_client: ClientSession, url: str, auth: dict,
                         path: Path, min_part: int) -> list[int]:
    async with registry.head(url, headers=auth) as r:
        assert r.status == 200, r.status
        total = int(r.headers["Content-Length"])
    size = min(max(total // NUM_PARTS, min_part), MAX_PART)
    parts = [(offset, min(size, total - offset)) for offset in range(0, total, size)]
    # one GET without Range: a 307 to another host or a 200, and its Location either way
    async with registry.get(url, headers=auth, allow_redirects=False) as r:
        assert r.status in (200, 307), r.status
        if "Location" not in r.headers:
            raise NoLocation(url)
        direct = r.headers["Location"]
        # Ollama closes the body unread
    path.parent.mkdir(parents=True, exist_ok=True)
    statuses = []
    with open(f"{path}-partial", "wb") as f:
        f.truncate(total)

        async def part(offset: int, length: int) -> None:
            # http.DefaultClient: no Authorization header, and the status is never looked at
            async with default_client.get(direct, headers={"Range": f"bytes={offset}-{offset + length - 1}"}) as r:
                statuses.append(r.status)
                done = 0
                while done < length:  # io.CopyN: up to the part's size, or the end of the body
                    chunk = await r.content.read(length - done)
                    if not chunk:
                        break
                    f.seek(offset + done)
                    f.write(chunk)
                    done += len(chunk)

        await asyncio.gather(*(part(o, n) for o, n in parts))
    os.rename(f"{path}-partial", path)
    return statuses


# -- fixtures ------------------------------------------------------------------------------


def ollama_models_dir(root: Path, host: str, namespace: str, model: str, tag: str,
                      layers: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, bytes]]:
    """Write an Ollama models dir as ``ollama pull`` leaves it; returns the manifest and blobs by digest."""
    blobs = {}
    descriptors = []
    for media_type, data in layers:
        descriptors.append({"mediaType": media_type, "digest": sha256(data), "size": len(data)})
        blobs[sha256(data)] = data
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                         "model_type": "1K", "file_type": "Q4_K_M", "architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]}}).encode()
    blobs[sha256(config)] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER,
                           "config": {"mediaType": CONFIG, "digest": sha256(config), "size": len(config)},
                           "layers": descriptors}).encode()
    for digest, data in blobs.items():
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    path = root / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest)
    return manifest, blobs


@pytest.fixture
def ollama_fixture(tmp_path):
    layers = [("application/vnd.ollama.image.model", gguf_bytes(n_floats=2048)),
              ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
              ("application/vnd.ollama.image.license", b"Apache-2.0\n"),
              ("application/vnd.ollama.image.params", b'{"stop":["<|eot|>"]}\n')]
    root = tmp_path / "ollama-models"
    manifest, blobs = ollama_models_dir(root, "registry.ollama.ai", "library", "tinyllama", "1b", layers)
    return root, manifest, blobs


def cli_import_ollama(settings, root: Path, name: str, *extra: str):
    return run_cli("import", "--ollama-models", str(root), name, "--data-dir", str(settings.data_dir),
                   "--dsn", settings.database.dsn, *extra)


def skopeo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SKOPEO, *args], capture_output=True, timeout=60)


# -- skopeo ----------------------------------------------------------------------------------


@needs_skopeo
async def test_skopeo_copies_a_gguf_as_an_ollama_model(server, make_file, make_artifact, make_token, tmp_path):
    content = gguf_bytes(n_floats=1 << 16)
    await make_artifact(make_file(content=content, name="model.gguf"), model="tinyllama", version="1b",
                        vendor="meta", inspect=True, capabilities={"chat_template": "{{ .Prompt }}"},
                        default_parameters={"temperature": 0.7})
    token = await make_token("node")
    out = tmp_path / "out"
    done = await asyncio.to_thread(skopeo, "copy", f"docker://{server.host}:{server.port}/meta/tinyllama:1b",
                                   f"dir:{out}", "--src-tls-verify=false", "--src-creds", f"x:{token}")
    assert done.returncode == 0, done.stderr.decode()
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert manifest["mediaType"] == OCI  # skopeo asks for OCI too, and cannot take Docker v2 with Ollama layers
    for d in [manifest["config"], *manifest["layers"]]:
        data = (out / d["digest"].split(":")[1]).read_bytes()
        assert sha256(data) == d["digest"] and len(data) == d["size"]
    [model] = [d for d in manifest["layers"] if d["mediaType"] == "application/vnd.ollama.image.model"]
    assert (out / model["digest"].split(":")[1]).read_bytes() == content


@needs_skopeo
async def test_ollama_models_import_then_skopeo_and_ollama_pull_it_byte_for_byte(
        server, settings, db, make_token, ollama_fixture, tmp_path, running_apps):
    root, manifest, blobs = ollama_fixture
    done = await asyncio.to_thread(cli_import_ollama, settings, root, "tinyllama:1b")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == sha256(manifest)  # the manifest's digest is the artifact's
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT m.name, m.vendor, v.version, v.capabilities, a.artifact_type FROM model_artifacts a "
            "JOIN model_versions v ON v.id = a.model_version_id JOIN models m ON m.id = v.model_id")
        [row] = await cur.fetchall()
    assert (row["name"], row["vendor"], row["version"], row["artifact_type"]) == ("tinyllama", None, "1b", "ollama")
    assert row["capabilities"] == {"architecture": "llama", "size_label": "1K", "quantization": "Q4_K_M"}
    for app in running_apps:  # the catalog hears of the import by notification; don't wait for it
        await app[CATALOG].reload()
    token = await make_token("node")
    base = f"{server.host}:{server.port}"
    out = tmp_path / "out"
    done = await asyncio.to_thread(skopeo, "copy", f"docker://{base}/library/tinyllama:1b", f"dir:{out}",
                                   "--src-tls-verify=false", "--src-creds", f"x:{token}")
    assert done.returncode == 0, done.stderr.decode()
    copied = json.loads((out / "manifest.json").read_bytes())
    original = json.loads(manifest)
    assert copied["config"] == original["config"] and copied["layers"] == original["layers"]
    for digest, data in blobs.items():
        assert (out / digest.split(":")[1]).read_bytes() == data
    # by its digest the original manifest is served byte for byte, to skopeo as to anyone
    done = await asyncio.to_thread(skopeo, "inspect", "--raw", f"docker://{base}/library/tinyllama@{sha256(manifest)}",
                                   "--tls-verify=false", "--creds", f"x:{token}")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == manifest
    # and Ollama gets exactly what it had
    models = tmp_path / "node-models"
    await ollama_pull(f"http://{base}", "library/tinyllama", "1b", models, token=token, min_part=1024)
    assert (models / "manifests" / base / "library" / "tinyllama" / "1b").read_bytes() == manifest
    for digest, data in blobs.items():
        assert (models / "blobs" / digest.replace(":", "-")).read_bytes() == data


async def test_ollama_models_import_verifies_every_blob(settings, ollama_fixture):
    root, manifest, blobs = ollama_fixture
    model = next(d for d, data in blobs.items() if data.startswith(b"GGUF"))
    path = root / "blobs" / model.replace(":", "-")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    done = await asyncio.to_thread(cli_import_ollama, settings, root, "registry.ollama.ai/library/tinyllama:1b")
    assert done.returncode == 1
    assert str(path) in done.stderr and model in done.stderr
    path.write_bytes(bytes(data[:-1]))
    done = await asyncio.to_thread(cli_import_ollama, settings, root, "tinyllama:1b")
    assert done.returncode == 1 and "the manifest says" in done.stderr
    done = await asyncio.to_thread(cli_import_ollama, settings, root, "tinyllama:70b")
    assert done.returncode == 1
    assert "no manifest" in done.stderr and "registry.ollama.ai/library/tinyllama:1b" in done.stderr
    done = await asyncio.to_thread(cli_import_ollama, settings, root, "../etc:passwd")
    assert done.returncode == 2 and "invalid Ollama model name" in done.stderr


# -- Ollama's download algorithm -----------------------------------------------------------------


@pytest.fixture
async def dropped_gguf(start_server, make_settings, db, make_token):
    """A real GGUF dropped into the import folder of a running daemon, and servers to pull it from."""
    settings = make_settings(**{"syncd.settle_seconds": 0.3})
    daemon = SyncDaemon(settings, db)
    await daemon.start()
    try:
        content = gguf_bytes(n_floats=1 << 23)  # 32 MiB: more than loopback buffers, so hang-ups are real
        folder = settings.import_dir / "meta" / "tinyllama" / "1b"
        folder.mkdir(parents=True)
        (folder / "tinyllama.gguf.json").write_text(json.dumps({"capabilities": {"chat_template": "{{ .Prompt }}"}}))
        (folder / "tinyllama.gguf").write_bytes(content)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (folder / "tinyllama.gguf").exists():
            assert loop.time() < deadline, "the daemon did not import the GGUF"
            await asyncio.sleep(0.05)
    finally:
        await daemon.stop()
    return settings, content


async def test_ollama_pull_from_a_trusted_network_without_credentials(start_server, make_settings, dropped_gguf,
                                                                      tmp_path):
    settings, content = dropped_gguf
    srv = await start_server(make_settings(**{"server.trusted_networks": ["127.0.0.0/8"]}))
    base = f"http://{srv.host}:{srv.port}"
    models = tmp_path / "models"
    manifest = await ollama_pull(base, "meta/tinyllama", "1b", models, min_part=1024)
    [model] = [d for d in manifest["layers"] if d["mediaType"] == "application/vnd.ollama.image.model"]
    assert (models / "blobs" / model["digest"].replace(":", "-")).read_bytes() == content
    template = [d for d in manifest["layers"] if d["mediaType"] == "application/vnd.ollama.image.template"]
    assert (models / "blobs" / template[0]["digest"].replace(":", "-")).read_bytes() == b"{{ .Prompt }}"


async def test_ollama_pull_with_a_token_fetches_16_unauthenticated_parts_through_the_signed_location(
        start_server, settings, dropped_gguf, make_token, tmp_path, caplog):
    _, content = dropped_gguf
    caplog.set_level(logging.INFO, logger="modelcache.access")
    srv = await start_server(settings)  # no trusted networks: every byte needs the token or its signature
    token = await make_token("node")
    base = f"http://{srv.host}:{srv.port}"
    async with ClientSession() as http:
        async with http.get(f"{base}/v2/meta/tinyllama/manifests/1b",
                            headers={"Authorization": f"Bearer {token}", "Accept": DOCKER}) as r:
            manifest = await r.json(content_type=None)
    [model] = [d for d in manifest["layers"] if d["mediaType"] == "application/vnd.ollama.image.model"]
    url = f"{base}/v2/meta/tinyllama/blobs/{model['digest']}"
    async with ClientSession() as registry, ClientSession() as anonymous:
        path = tmp_path / "blob"
        statuses = await _download_blob(registry, anonymous, url, {"Authorization": f"Bearer {token}"}, path,
                                        min_part=len(content) // 16)
    assert len(content) % 16 == 0 and statuses == [206] * 16
    assert path.read_bytes() == content
    # the whole pull, manifest to verified blobs, as ollama pull does it
    await ollama_pull(base, "meta/tinyllama", "1b", tmp_path / "models", token=token,
                      min_part=len(content) // 16)
    # Ollama hangs up on every whole-body GET: that is no server error
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    # the 16 parts are in the access log, their signatures are not
    parts = [r.getMessage() for r in caplog.records if r.name == "modelcache.access" and "signature=" in r.getMessage()]
    assert len(parts) >= 16 and all("signature=REDACTED" in line for line in parts)


async def test_without_location_or_signature_ollama_could_not_pull(start_server, settings, dropped_gguf,
                                                                   make_token):
    """What the Location header and its signature are for: the parts carry no credentials."""
    _, content = dropped_gguf
    srv = await start_server(settings)
    token = await make_token("node")
    base = f"http://{srv.host}:{srv.port}"
    async with ClientSession() as http:
        async with http.get(f"{base}/v2/meta/tinyllama/manifests/1b",
                            headers={"Authorization": f"Bearer {token}", "Accept": DOCKER}) as r:
            model = next(d for d in (await r.json(content_type=None))["layers"]
                         if d["mediaType"] == "application/vnd.ollama.image.model")
        async with http.get(f"{base}/v2/meta/tinyllama/blobs/{model['digest']}", headers={"Range": "bytes=0-99"}) as r:
            assert r.status == 401  # the unsigned URL, without credentials, is refused


# -- /v2 while PostgreSQL is frozen -------------------------------------------------------------


@contextlib.contextmanager
def postgres_frozen(admin_dsn: str) -> Iterator[list[psutil.Process]]:
    """SIGSTOP the test PostgreSQL's postmaster and every process under it (backends, walwriter, ...),
    so any query hangs as it does when the database host stalls; SIGCONT whatever happens."""
    if os.environ.get("MODELCACHE_TEST_DSN"):
        pytest.skip("freezes the PostgreSQL the test session started; MODELCACHE_TEST_DSN names another")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        data_dir = Path(conn.execute("SHOW data_directory").fetchone()[0])
    postmaster = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    frozen: list[psutil.Process] = []
    try:
        postmaster.send_signal(signal.SIGSTOP)  # first: a stopped postmaster starts no new backend
        frozen.append(postmaster)
        for child in postmaster.children(recursive=True):
            child.send_signal(signal.SIGSTOP)
            frozen.append(child)
        for _ in range(200):  # a signal is delivered when the process is next scheduled
            running = [(p.pid, p.status()) for p in frozen  # a zombie: exited, the postmaster can't reap it
                       if p.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)]
            if not running:
                break
            time.sleep(0.01)
        assert not running, f"PostgreSQL processes not stopped: {running}"
        yield frozen
    finally:
        for p in reversed(frozen):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)


@pytest.fixture
async def imported_gguf(make_file, make_artifact):
    """A GGUF imported (its manifests made) as meta/tinyllama:1b before anything is frozen."""
    content = gguf_bytes(n_floats=1 << 20)  # 4 MiB, pulled in 16 parts
    await make_artifact(make_file(content=content, name="tinyllama.gguf"), model="tinyllama", version="1b",
                        vendor="meta", inspect=True, capabilities={"chat_template": "{{ .Prompt }}"},
                        default_parameters={"temperature": 0.7})
    return content


async def test_manifests_tags_and_catalog_run_no_sql(server, pg_admin_dsn, make_token, imported_gguf):
    """With every PostgreSQL process stopped, a query would hang: each answer must come from memory."""
    token = await make_token("node")
    auth = {"Authorization": f"Bearer {token}"}
    async with ClientSession(timeout=ClientTimeout(total=5)) as http:
        async with http.get(server.make_url("/v2/meta/tinyllama/manifests/1b"), headers={**auth, "Accept": DOCKER}) as r:
            docker = await r.read()
        with postgres_frozen(pg_admin_dsn):
            for accept, expected in ((DOCKER, DOCKER), (OCI, OCI)):
                for method in ("GET", "HEAD"):
                    async with http.request(method, server.make_url("/v2/meta/tinyllama/manifests/1b"),
                                            headers={**auth, "Accept": accept}) as r:
                        assert r.status == 200 and r.headers["Content-Type"] == expected, (method, accept)
            async with http.get(server.make_url(f"/v2/meta/tinyllama/manifests/{sha256(docker)}"),
                                headers={**auth, "Accept": OCI}) as r:
                assert r.status == 200 and await r.read() == docker
            async with http.get(server.make_url("/v2/meta/tinyllama/tags/list"), headers=auth) as r:
                assert r.status == 200 and (await r.json())["tags"] == ["1b"]
            async with http.get(server.make_url("/v2/_catalog"), headers=auth) as r:
                assert r.status == 200 and (await r.json())["repositories"] == ["meta/tinyllama"]
            async with http.get(server.make_url("/v2/meta/tinyllama/manifests/2b"), headers=auth) as r:
                assert r.status == 404  # an unknown tag is known to be unknown without asking the database


@needs_skopeo
async def test_ollama_and_skopeo_pull_while_postgres_is_frozen(server, pg_admin_dsn, make_token, imported_gguf,
                                                                tmp_path):
    content = imported_gguf
    token = await make_token("node")
    base = f"{server.host}:{server.port}"
    with postgres_frozen(pg_admin_dsn) as frozen:
        assert len(frozen) > 2  # the postmaster and its backends
        models = tmp_path / "ollama-models"
        manifest = await asyncio.wait_for(
            ollama_pull(f"http://{base}", "meta/tinyllama", "1b", models, token=token, min_part=len(content) // 16),
            timeout=20)
        [model] = [d for d in manifest["layers"] if d["mediaType"] == "application/vnd.ollama.image.model"]
        assert (models / "blobs" / model["digest"].replace(":", "-")).read_bytes() == content
        out = tmp_path / "skopeo"
        done = await asyncio.to_thread(skopeo, "copy", f"docker://{base}/meta/tinyllama:1b", f"dir:{out}",
                                       "--src-tls-verify=false", "--src-creds", f"x:{token}")
        assert done.returncode == 0, done.stderr.decode()
        copied = json.loads((out / "manifest.json").read_bytes())
        assert copied["mediaType"] == OCI
        assert [d["digest"] for d in copied["layers"]] == [d["digest"] for d in manifest["layers"]]
        assert (out / model["digest"].split(":")[1]).read_bytes() == content
