"""The node's pull client and agent against a cache that lies or fails: a real aiohttp server on 127.0.0.1
that answers like modelcache except where a test tells it not to, real files, the real CLI in a subprocess."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelcache.digest import Digest
from modelcache.errors import ModelcacheError
from modelcache.node.pull import CacheClient, PullSettings
from node_fakes import KiB, MiB, FakeCache, make_agent, make_cache, run_until  # noqa: F401 - fixtures


async def pull_cli(cache: FakeCache, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "modelcache", "pull", *args,
                                                    "--url", cache.url, "--token", "node-token"],
                                   cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- a small body in two TCP writes ----------------------------------------------------------------------


async def test_small_blob_in_two_writes_is_read_whole(make_cache):
    cache = await make_cache()
    cache.two_writes = True
    manifest = json.dumps({"schemaVersion": 2, "layers": [{"digest": "sha256:" + "ab" * 32}] * 8}).encode()
    digest = cache.add_blob(manifest)["digest"]
    too_big = cache.add_blob(os.urandom(3000))["digest"]
    async with CacheClient(cache.url, "node-token") as client:
        assert await client.fetch_small(Digest.parse(digest)) == manifest
        with pytest.raises(ModelcacheError, match=r"larger than 2048 bytes"):
            await client.fetch_small(Digest.parse(too_big), limit=2048)


# -- an answer that is not the cache's JSON ------------------------------------------------------------


async def test_agent_waits_out_a_maintenance_page_then_takes_a_load(make_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="modelcache")
    cache = await make_cache()
    cache.add_load([{"path": "m.safetensors", **cache.add_blob(os.urandom(100 * KiB))}])
    cache.html_until = time.monotonic() + 2.5  # every route, the agent's first calls included
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    taken = await run_until(agent, lambda: any(r["status"] == "available" for r in cache.reports))
    assert taken, [r.getMessage() for r in caplog.records]
    said = [r.getMessage() for r in caplog.records if "text/html" in r.getMessage()]
    assert said and cache.url in said[0] and "200" in said[0] and "Down for maintenance" in said[0], said
    assert (tmp_path / "files" / "acme" / "m" / "1" / "m.safetensors").stat().st_size == 100 * KiB


async def test_agent_loop_survives_an_unexpected_error(make_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="modelcache")
    cache = await make_cache()
    cache.add_load([{"path": "m.safetensors", **cache.add_blob(os.urandom(10 * KiB))}])
    cache.odd_loads = 1  # JSON, but a list where the loads object belongs: a TypeError in the loop's step
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    taken = await run_until(agent, lambda: any(r["status"] == "available" for r in cache.reports))
    assert taken
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "modelcache.node.agent"]
    assert len(errors) == 1 and errors[0].exc_info and "TypeError" in errors[0].getMessage(), errors


# -- a full disk -------------------------------------------------------------------------------------------


async def test_disk_full_at_the_first_progress_file_is_one_line_and_keeps_nothing(make_cache, make_tmpfs):
    cache = await make_cache()
    disk = make_tmpfs(4 * MiB)
    digest = cache.add_blob(os.urandom(4 * MiB))["digest"]  # fills the tmpfs when preallocated: no page for the sidecar
    done = await pull_cli(cache, digest, "-o", str(disk / "x.bin"))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert "no room left" in line and "x.bin.partial.parts" in line and "nothing partial is kept" in line, line
    assert list(disk.iterdir()) == []


async def test_disk_full_mid_pull_keeps_completed_parts_and_freed_space_resumes(make_cache, make_tmpfs):
    cache = await make_cache()
    disk = make_tmpfs(4 * MiB)
    data = os.urandom(2 * MiB)
    digest = cache.add_blob(data)["digest"]
    out = disk / "x.bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "pull", digest, "-o", str(out), "--url", cache.url,
        "--part-size", "64k", "--parallel", "1", "--limit-rate", "256k", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    sidecar = disk / "x.bin.partial.parts"
    for _ in range(400):
        await asyncio.sleep(0.02)
        try:
            if len(json.loads(sidecar.read_text())["done"]) >= 2:
                break
        except (OSError, ValueError):
            continue
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # another program takes the rest of the disk
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    stderr = (await proc.stderr.read()).decode()
    assert await proc.wait() == 1
    line = one_line(stderr)
    assert "no room left" in line and "freed space lets `modelcache pull` resume" in line, line
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "x.bin.partial", "x.bin.partial.parts"]

    filler.unlink()
    served_before = cache.blob_bytes_served
    done = await pull_cli(cache, digest, "-o", str(out), "--part-size", "64k")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == data
    assert sorted(p.name for p in disk.iterdir()) == ["x.bin"]
    assert cache.blob_bytes_served - served_before < len(data)  # the recorded parts were not fetched again


# -- redirects -------------------------------------------------------------------------------------------


async def test_a_redirect_off_the_cache_is_refused(make_cache, tmp_path):
    cache, elsewhere = await make_cache(), await make_cache()
    data = os.urandom(300 * KiB)
    digest = cache.add_blob(data)["digest"]
    elsewhere.add_blob(data)
    cache.redirect_blobs_to = elsewhere.url
    async with CacheClient(cache.url, "node-token", PullSettings(part_bytes=64 * KiB)) as client:
        with pytest.raises(ModelcacheError) as caught:
            await client.pull_blob(Digest.parse(digest), tmp_path / "x.bin", size=len(data))
    assert elsewhere.url in caught.value.detail and cache.url in caught.value.detail, caught.value.detail
    assert elsewhere.requests == 0
    assert list(tmp_path.iterdir()) == []


# -- names the cache sends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model, version", [("m", "../../../escaped"), ("..", "1")])
async def test_default_output_folder_refuses_names_the_cache_should_never_send(make_cache, tmp_path, model, version):
    cache = await make_cache()
    a = cache.add_artifact([{"path": "a.safetensors", **cache.add_blob(b"one")},
                            {"path": "b/c.safetensors", **cache.add_blob(b"two")}], model=model, version=version)
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    done = await pull_cli(cache, a["digest"], cwd=cwd)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert a["digest"] in line and repr(version if model == "m" else model) in line, line
    assert [p for p in tmp_path.rglob("*")] == [tmp_path / "a", tmp_path / "a" / "b", cwd]
