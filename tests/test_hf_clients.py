"""The real, unmodified huggingface_hub pulls from a real ``modelcache serve`` process.

The client runs in its own process because it reads HF_ENDPOINT when it is imported. Xet is
not turned off (HF_HUB_DISABLE_XET is unset while hf_xet is installed): the mirror must keep
the client on plain HTTP by never advertising Xet. A second run must be served from the
client's own cache, which the server's access log tells.
"""

import asyncio
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_embedded import free_port, wait_ready
from test_hf_api import snapshot_files, write_snapshot

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

REPO = "acme/tiny"

CLIENT = r'''
import hashlib, importlib.util, json, os, sys
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError

repo, commit1 = sys.argv[1], sys.argv[2]


def digests(folder):
    root = Path(folder)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


out = {"endpoint": constants.ENDPOINT, "xet_importable": importlib.util.find_spec("hf_xet") is not None,
       "xet_disabled": constants.HF_HUB_DISABLE_XET}
main = snapshot_download(repo)  # main: resolved by repo_info, then the tree, then one download per file
out["main"] = {"commit": Path(main).name, "files": digests(main)}
pinned = snapshot_download(repo, revision=commit1)  # by commit id: no repo_info, straight to the tree
out["pinned"] = {"commit": Path(pinned).name, "files": digests(pinned)}
one = hf_hub_download(repo, "tokenizer/tokenizer.json", revision="1")  # HEAD, then GET
out["one"] = {"commit": Path(one).parents[1].name, "sha256": hashlib.sha256(Path(one).read_bytes()).hexdigest()}
try:
    hf_hub_download(repo, "generation_config.json")  # what transformers probes for
    out["missing"] = "downloaded?"
except EntryNotFoundError:
    out["missing"] = "EntryNotFound"
print(json.dumps(out))
'''


class Server:
    """``python -m modelcache serve`` on a free loopback port, its log in a file."""

    def __init__(self, dsn: str, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "serve", "--dsn", dsn, "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=self._log,
            env={k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")})
        wait_ready(self.port, self.proc)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/hf"

    def resolve_gets(self) -> list[str]:
        """Access-log lines of file downloads (not HEADs, not metadata)."""
        time.sleep(1.0)  # the server writes its access log twice a second
        return [line for line in self.log.read_text().splitlines()
                if " GET /hf/" in line and "/resolve/" in line and "modelcache.access" in line]

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(60) == 0
        self._log.close()


@pytest.fixture
async def cache(dsn, settings, tmp_path, make_artifact, make_token):
    """Two versions of acme/tiny imported through the real import road, then a real server."""
    imported = {}
    for version in ("1", "2"):
        files = snapshot_files(f"{REPO}:{version}")
        result = await make_artifact(write_snapshot(tmp_path / f"snapshot-{version}", files), model="tiny",
                                     version=version, artifact_type="safetensors", vendor="acme")
        imported[version] = (files, result.digest.hex[:40])
    token = await make_token("node")
    server = await asyncio.to_thread(Server, dsn, settings.data_dir, tmp_path / "server.log")
    yield server, token, imported
    await asyncio.to_thread(server.stop)


def client_env(server: Server, token: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=server.endpoint, HF_TOKEN=token, HF_HOME=str(home), NO_PROXY="127.0.0.1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


async def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())}


async def test_snapshot_download_and_hf_hub_download_pull_from_the_cache_then_from_their_own(cache, tmp_path):
    server, token, imported = cache
    (files1, commit1), (files2, commit2) = imported["1"], imported["2"]
    assert importlib.util.find_spec("hf_xet") is not None, "hf_xet is installed with huggingface_hub"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = client_env(server, token, tmp_path / "hf-home")

    first = json.loads((await run([sys.executable, str(script), REPO, commit1], env)).stdout)
    assert first["endpoint"] == server.endpoint
    assert first["xet_importable"] and not first["xet_disabled"]
    assert first["main"] == {"commit": commit2, "files": sha256s(files2)}  # main: the newest version
    assert first["pinned"] == {"commit": commit1, "files": sha256s(files1)}
    tokenizer = hashlib.sha256(files1["tokenizer/tokenizer.json"]).hexdigest()
    assert first["one"] == {"commit": commit1, "sha256": tokenizer}
    assert first["missing"] == "EntryNotFound"
    downloads = server.resolve_gets()
    # each file of both snapshots once; the single file was already in the client's cache from the
    # pinned snapshot (same sha256, so the same cache blob)
    assert len(downloads) == len(files1) + len(files2), downloads
    assert all(" 200 who=token:" in line for line in downloads)
    blobs = tmp_path / "hf-home" / "hub" / "models--acme--tiny" / "blobs"
    assert {p.name for p in blobs.iterdir()} >= {tokenizer, *sha256s(files2).values()}

    second = json.loads((await run([sys.executable, str(script), REPO, commit1], env)).stdout)
    assert second == first
    assert server.resolve_gets() == downloads, "the second run downloaded again instead of using its cache"


async def test_the_hf_download_command_with_a_token_from_the_environment(cache, tmp_path):
    server, token, imported = cache
    files1, _ = imported["1"]
    hf = Path(sys.executable).with_name("hf")
    target = tmp_path / "tiny-1"
    env = client_env(server, token, tmp_path / "hf-home")
    await run([str(hf), "download", REPO, "--revision", "1", "--local-dir", str(target)], env)
    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*")
           if p.is_file() and ".cache" not in p.parts}
    assert got == files1

    denied = await asyncio.to_thread(
        subprocess.run, [str(hf), "download", REPO, "config.json", "--local-dir", str(tmp_path / "no")],
        env={**env, "HF_TOKEN": "mc_revoked-or-wrong"}, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    assert "unknown or revoked token" in denied.stdout + denied.stderr


async def test_the_environment_a_node_registration_writes_points_hf_download_at_the_cache(cache, tmp_path,
                                                                                      make_token):
    """``node-register --env-out``: the file, and nothing else, sends ``hf download`` to the cache."""
    server, _, imported = cache
    env_file = tmp_path / "runtime.env"
    cli_env = {"MODELCACHE_URL": f"http://127.0.0.1:{server.port}", "MODELCACHE_TOKEN": await make_token("admin")}
    done = await asyncio.to_thread(run_cli, "node-register", "worker-1", "--runtime", "hf", "--env-out",
                                   str(env_file), env=cli_env)
    assert done.returncode == 0, done.stderr
    assert env_file.stat().st_mode & 0o077 == 0  # it holds the node's token
    written = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))
    assert written["HF_ENDPOINT"] == server.endpoint and written["HF_TOKEN"].startswith("mc_")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(written, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    target = tmp_path / "tiny-1"
    await run([str(Path(sys.executable).with_name("hf")), "download", REPO, "--revision", "1",
               "--local-dir", str(target)], env)
    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*")
           if p.is_file() and ".cache" not in p.parts}
    assert got == imported["1"][0]
    gets = server.resolve_gets()
    assert gets and all(" 200 who=token:node-" in line for line in gets)  # as the node, with its token


async def test_list_repo_refs_names_main_and_each_version(cache):
    # in this process: HfApi takes its endpoint as an argument, not from HF_ENDPOINT at import time
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    server, token, imported = cache
    (_, commit1), (_, commit2) = imported["1"], imported["2"]
    api = HfApi(endpoint=server.endpoint, token=token)
    refs = await asyncio.to_thread(api.list_repo_refs, REPO, include_pull_requests=True)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [
        ("main", "refs/heads/main", commit2), ("2", "refs/heads/2", commit2), ("1", "refs/heads/1", commit1)]
    assert (refs.tags, refs.converts, refs.pull_requests) == ([], [], [])
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(api.list_repo_refs, "acme/nothing")
