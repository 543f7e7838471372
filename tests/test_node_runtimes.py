"""The node's runtimes: what an engine finds on disk after an install from a real server over loopback."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import safetensors_bytes
from modelcache.digest import Digest
from modelcache.errors import ChecksumError
from modelcache.formats.ollama import Manifest, ModelName, ModelsDir
from modelcache.node.pull import CacheClient, PullSettings
from modelcache.node.runtimes import FilesRuntime, HfRuntime, Job, NodeStore, OllamaRuntime

pytestmark = pytest.mark.registry

MiB = 1 << 20


@pytest.fixture
async def node(server, make_token, tmp_path):
    """A CacheClient with a node token, and the node's store."""
    url = str(server.make_url("")).rstrip("/")
    async with CacheClient(url, await make_token("node"), PullSettings(parallel_parts=2, part_bytes=256 << 10)) as c:
        yield c, NodeStore(tmp_path / "state"), f"{server.host}:{server.port}"


async def job_for(client, store, digest) -> Job:
    artifact = await client.call("GET", f"/v1/artifacts/{digest}")
    return Job(artifact, artifact["model_version_id"], store, client)


async def test_ollama_layout_is_byte_correct_and_readable(node, make_file, make_artifact, tmp_path, http, server):
    client, store, host = node
    src = make_file(2 * MiB, gguf=True)
    result = await make_artifact(src, model="Tiny", version="1", vendor="acme")
    models = tmp_path / "ollama"
    installed = await OllamaRuntime(models, host, alias=True).install(await job_for(client, store, result.digest))

    async with http.get(server.make_url("/v2/acme/tiny/manifests/1"), headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json",
            "Authorization": f"Bearer {client.token}"}) as r:
        assert r.status == 200
        served = await r.read()
    folder = ModelsDir(models)
    for name in (f"{host}/acme/tiny:1", "tiny:1"):  # the cache's name and the registry.ollama.ai alias
        path = folder.find_manifest(ModelName.parse(name))
        assert path.read_bytes() == served and str(path) in installed.paths
    manifest = Manifest.parse(served, "served")
    for d in manifest.blobs:
        data = folder.blob_path(d.digest).read_bytes()
        assert hashlib.sha256(data).hexdigest() == d.digest.hex and len(data) == d.size
    assert folder.blob_path(result.digest).read_bytes() == src.read_bytes()  # the GGUF is the model layer
    assert not list(models.rglob("*.tmp")) and not list(models.rglob("*.partial*"))


async def test_ollama_manifest_is_written_last(node, make_file, make_artifact, store, tmp_path):
    """A blob that fails its check stops the install before the manifest: Ollama never lists half a model."""
    client, node_store, host = node
    result = await make_artifact(make_file(MiB, gguf=True), model="broken", version="1")
    stored = store.path_for(result.digest)
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 4096)
    models = tmp_path / "ollama"
    with pytest.raises(ChecksumError):
        await OllamaRuntime(models, host).install(await job_for(client, node_store, result.digest))
    assert not (models / "manifests").exists()
    assert not node_store.has(result.digest, stored.stat().st_size)


def write_snapshot(folder: Path) -> dict[str, bytes]:
    files = {"config.json": json.dumps({"model_type": "llama"}).encode(),
             "model.safetensors": safetensors_bytes({"w": ("F32", [64, 1024])}),
             "tokenizer/tokenizer.json": b'{"version": "1.0"}'}
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return files


async def test_hf_layout_loads_offline_with_huggingface_hub(node, make_artifact, tmp_path):
    client, store, _ = node
    files = write_snapshot(tmp_path / "snap")
    result = await make_artifact(tmp_path / "snap", model="tiny-st", version="2", vendor="acme",
                                 artifact_type="safetensors")
    cache = tmp_path / "hf" / "hub"
    await HfRuntime(cache).install(await job_for(client, store, result.digest))

    repo = cache / "models--acme--tiny-st"
    commit = result.digest.hex[:40]
    assert (repo / "refs" / "2").read_bytes() == commit.encode()  # no trailing newline
    link = repo / "snapshots" / commit / "tokenizer" / "tokenizer.json"
    assert os.readlink(link) == f"../../../blobs/{hashlib.sha256(files['tokenizer/tokenizer.json']).hexdigest()}"

    script = ("import sys, huggingface_hub as h; "
              "print(h.snapshot_download('acme/tiny-st', revision=sys.argv[1], cache_dir=sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing may be fetched
    for revision in ("2", "main"):
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script, revision, str(cache)],
                                       env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        folder = Path(done.stdout.strip().splitlines()[-1])
        assert folder == repo / "snapshots" / commit
        assert {p: (folder / p).read_bytes() for p in files} == files


async def test_one_copy_hard_linked_into_every_layout(node, make_file, make_artifact, tmp_path):
    client, store, host = node
    src = make_file(MiB, gguf=True, name="tiny.gguf")
    result = await make_artifact(src, model="tiny", version="3", vendor="acme")
    job = await job_for(client, store, result.digest)
    runtimes = [OllamaRuntime(tmp_path / "ollama", host), HfRuntime(tmp_path / "hf"), FilesRuntime(tmp_path / "files")]
    for runtime in runtimes:
        await runtime.install(job)
    paths = [store.path_for(result.digest), tmp_path / "ollama" / "blobs" / f"sha256-{result.digest.hex}",
             tmp_path / "hf" / "models--acme--tiny" / "blobs" / result.digest.hex,
             tmp_path / "files" / "acme" / "tiny" / "3" / "tiny.gguf"]
    inodes = {os.stat(p).st_ino for p in paths}
    assert len(inodes) == 1 and os.stat(paths[0]).st_nlink == 4
    assert paths[-1].read_bytes() == src.read_bytes()
    hf_file = tmp_path / "hf" / "models--acme--tiny" / "snapshots" / result.digest.hex[:40] / "tiny.gguf"
    assert hf_file.is_symlink() and hf_file.read_bytes() == src.read_bytes()
    assert Digest.from_hex(hashlib.sha256(paths[1].read_bytes()).hexdigest()) == result.digest
