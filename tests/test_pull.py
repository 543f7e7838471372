"""``modelcache pull`` as a node runs it: a real subprocess against a real server over loopback."""

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.registry

MiB = 1 << 20


@pytest.fixture
async def node_env(server, make_token):
    return {"MODELCACHE_URL": str(server.make_url("")).rstrip("/"), "MODELCACHE_TOKEN": await make_token("node")}


async def pull(env, *args):
    return await asyncio.to_thread(run_cli, "pull", *args, env=env)


def fetched_bytes(caplog, digest) -> int:
    """Bytes the server sent for this digest, from its access log lines."""
    total = 0
    for r in caplog.records:
        if r.name == "modelcache.access" and f"digest={digest}" in r.getMessage():
            total += int(re.search(r" bytes=(\d+) ", r.getMessage()).group(1))
    return total


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


async def test_pull_by_digest_and_by_name(node_env, make_file, make_artifact, tmp_path):
    src = make_file(3 * MiB + 123, gguf=True, name="tiny.gguf")
    result = await make_artifact(src, model="tiny", version="1", vendor="acme")
    out = tmp_path / "out" / "model.gguf"
    done = await pull(node_env, str(result.digest), "-o", str(out), "--part-size", "256k", "--parallel", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert out.read_bytes() == src.read_bytes()
    assert leftovers(out.parent) == []

    by_name = tmp_path / "byname"
    by_name.mkdir()
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "modelcache", "pull", "acme/tiny:1"],
                                   cwd=by_name, capture_output=True, text=True,
                                   env={**os.environ, **node_env})
    assert done.returncode == 0, done.stderr
    assert (by_name / "tiny.gguf").read_bytes() == src.read_bytes()


async def test_kill_9_mid_pull_resumes_without_refetching(node_env, make_file, make_artifact, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="modelcache.access")
    size = 6 * MiB
    src = make_file(size, gguf=True)
    result = await make_artifact(src)
    out = tmp_path / "blob.gguf"
    sidecar = tmp_path / "blob.gguf.partial.parts"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")} | node_env
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "pull", str(result.digest), "-o", str(out), "--part-size", "256k",
        "--parallel", "2", "--limit-rate", "3M", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    parts = -(-os.path.getsize(src) // (256 << 10))
    for _ in range(300):
        await asyncio.sleep(0.05)
        try:
            done_parts = len(json.loads(sidecar.read_text())["done"])
        except (OSError, ValueError):
            continue
        if done_parts >= parts // 2:
            break
    assert proc.returncode is None, (await proc.stderr.read()).decode()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert not out.exists() and (tmp_path / "blob.gguf.partial").exists()
    before = fetched_bytes(caplog, result.digest)
    assert 0 < before < os.path.getsize(src)

    done = await pull(node_env, str(result.digest), "-o", str(out), "--part-size", "256k")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == result.digest.hex
    assert leftovers(tmp_path) == []
    total = fetched_bytes(caplog, result.digest)
    assert total < 1.5 * os.path.getsize(src), (before, total)


async def test_corrupt_blob_fails_naming_both_digests_and_keeps_nothing(node_env, make_file, make_artifact, store,
                                                                      tmp_path):
    result = await make_artifact(make_file(2 * MiB, gguf=True))
    stored = store.path_for(result.digest)
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as f:  # same size, different bytes: the server has no way to know
        f.seek(MiB)
        f.write(b"\xff" * 4096)
    out = tmp_path / "x.gguf"
    done = await pull(node_env, str(result.digest), "-o", str(out), "--part-size", "256k")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    actual = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert str(result.digest) in done.stderr and f"sha256:{actual}" in done.stderr
    assert list(tmp_path.glob("x.gguf*")) == []


async def test_404_401_403_are_one_line_errors(node_env, make_file, make_artifact, db, tmp_path):
    missing = "sha256:" + "ab" * 32
    done = await pull(node_env, missing, "-o", str(tmp_path / "m"))
    assert done.returncode == 1 and "404" in done.stderr and missing in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    async with db.connection() as conn:
        await conn.execute(
            "INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
            "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    staged = await make_artifact(make_file(4096, gguf=True), model="other")
    assert staged.state == "staged"
    done = await pull(node_env, str(staged.digest), "-o", str(tmp_path / "s"))
    assert done.returncode == 1 and "403" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    done = await pull({**node_env, "MODELCACHE_TOKEN": "nope"}, str(staged.digest), "-o", str(tmp_path / "u"))
    assert done.returncode == 1 and "401" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert leftovers(tmp_path) == [] and not any((tmp_path / n).exists() for n in "msu")

    done = await pull(node_env, "not-a-ref")
    assert done.returncode == 2 and "expected sha256:<hex> or [vendor/]model:version" in done.stderr


async def test_disk_full_is_one_line_and_keeps_nothing(node_env, make_file, make_artifact, make_tmpfs):
    tiny_fs = make_tmpfs(MiB)
    result = await make_artifact(make_file(3 * MiB, gguf=True))
    done = await pull(node_env, str(result.digest), "-o", str(tiny_fs / "x.gguf"))
    assert done.returncode == 1
    assert "no room left" in done.stderr and str(tiny_fs) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tiny_fs.iterdir()) == []
