"""The node agent against a cache that lies or a disk that runs out: what a load reports, what is left on disk.

The cache here is a small aiohttp server on 127.0.0.1 that answers what the agent asks (artifacts, blobs,
loads) with whatever a test puts in it, names the real cache would never store included; the agent is the
real one, run in this process (or as ``modelcache node`` in a subprocess), on real folders.
"""

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelcache.errors import Conflict
from modelcache.node.runtimes import Inventory
from node_fakes import MiB, make_agent, make_cache, run_until  # noqa: F401 - fixtures

def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.is_dir()} if folder.exists() else set()


# -- 1. names from the cache are parsed before they become folders --------------------------


@pytest.mark.parametrize("runtime,field,value", [
    ("files", "version", "../../../../escaped-files"),
    ("files", "model", ".."),
    ("files", "vendor", "../../escaped-vendor"),
    ("hf", "version", "../../../../pwned-by-hf-ref"),
    ("hf", "model", "x/../../../../escaped-model"),
])
async def test_a_name_that_would_leave_its_folder_fails_the_load(make_cache, tmp_path, runtime, field, value):
    cache = await make_cache()
    names = {"model": "tiny", "version": "1", "vendor": "acme", field: value}
    load = cache.add_load(**names, files=[{"path": "tiny.gguf", **cache.add_blob(b"GGUF weights")}])
    target = tmp_path / "a" / "b" / runtime  # deep enough for the '..'s to land inside tmp_path
    agent = make_agent(cache, tmp_path / "state", runtimes=(runtime,), files_dir=target, hf_cache=target)
    assert await run_until(agent, cache.all_ended)

    status, error = cache.outcome(load)
    assert status == "failed" and repr(value) in error and f"invalid {field}" in error, error
    assert cache.blob_requests == 0  # refused before anything was pulled
    assert files_under(tmp_path) - files_under(tmp_path / "state") == set()


# -- 2. two loads sharing a blob ----------------------------------------------------------------------------


async def test_two_loads_sharing_a_blob_both_install_from_one_pull(make_cache, tmp_path):
    cache = await make_cache(blob_delay=0.3)
    data = os.urandom(3 << 20)
    blob = cache.add_blob(data)
    loads = [cache.add_load(model="llama3", version=v, files=[{"path": "llama3.gguf", **blob}])
             for v in ("8b", "latest")]
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    assert await run_until(agent, cache.all_ended)

    assert [cache.outcome(load) for load in loads] == [("available", None)] * 2
    for version in ("8b", "latest"):
        assert (tmp_path / "files" / "acme" / "llama3" / version / "llama3.gguf").read_bytes() == data
    assert cache.blob_bytes_served == len(data)  # pulled once, linked twice


# -- 3. a wrong-shaped installed.json -------------------------------------------------------------------


@pytest.mark.parametrize("content", ["null", "[]", '{"installed": null}', '{"installed": [{"runtime": "files"}]}',
                                     '{"installed": [{"runtime": "files", "model_version_id": "v", '
                                     '"artifact_digest": "sha256:0", "paths": "not a list"}]}'])
async def test_a_wrong_shaped_inventory_is_a_warning_and_an_empty_start(make_cache, tmp_path, caplog, content):
    cache = await make_cache()
    state = tmp_path / "state"
    state.mkdir()
    (state / "installed.json").write_text(content)
    agent = make_agent(cache, state, runtimes=("files",), files_dir=tmp_path / "files")
    with caplog.at_level(logging.WARNING, logger="modelcache.node.runtimes"):
        assert await run_until(agent, lambda: cache.heartbeats >= 2)

    warnings = [r.getMessage() for r in caplog.records if r.name == "modelcache.node.runtimes"]
    assert len(warnings) == 1 and str(state / "installed.json") in warnings[0], warnings
    assert "empty inventory" in warnings[0] and agent.installed == [] and cache.reports == []


async def test_a_well_formed_inventory_still_loads(tmp_path):
    entry = {"runtime": "files", "model_version_id": "v1", "artifact_digest": "sha256:" + "0" * 64,
             "paths": [str(tmp_path / "m.gguf")]}
    (tmp_path / "installed.json").write_text(json.dumps({"installed": [entry]}))
    assert [e.to_json() for e in Inventory(tmp_path).load()] == [entry]


# -- 4. a copy across filesystems that runs out of room ----------------------------------------------


async def test_a_copy_that_runs_out_of_room_leaves_no_temp_file(make_cache, tmp_path, make_tmpfs):
    small_tmpfs = make_tmpfs(4 * MiB, filler=3 * MiB)  # another filesystem than tmp_path, nearly full
    cache = await make_cache()
    blob = cache.add_blob(os.urandom(3_000_000))
    load = cache.add_load(model="tiny", version="1", files=[{"path": "tiny.gguf", **blob}])
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=small_tmpfs / "files")
    assert await run_until(agent, cache.all_ended)

    assert files_under(small_tmpfs) == {small_tmpfs / "filler"}  # no .tiny.gguf.<pid>.tmp
    status, error = cache.outcome(load)
    assert status == "failed" and error.startswith("no room to copy blob ") and "\n" not in error, error
    assert str(small_tmpfs / "files" / "acme" / "tiny" / "1" / "tiny.gguf") in error


# -- 5. one agent per state dir ---------------------------------------------------------------------------


async def test_a_second_agent_on_the_same_state_dir_refuses_to_start(make_cache, tmp_path):
    first, second = await make_cache(blob_delay=0.5), await make_cache()
    state = tmp_path / "state"
    load = first.add_load(model="alpha", version="1", files=[{"path": "a.gguf", **first.add_blob(b"alpha")}])
    second.add_load(model="beta", version="1", files=[{"path": "b.gguf", **second.add_blob(b"beta")}])
    running = make_agent(first, state, runtimes=("files",), files_dir=tmp_path / "files-a")
    ran = asyncio.create_task(run_until(running, first.all_ended))
    while not first.heartbeats:
        await asyncio.sleep(0.05)

    # in this process, and as `modelcache node` in another: refused, with one line naming the dir
    with pytest.raises(Conflict, match=f"state dir {state} is in use by another node agent .*--state-dir"):
        await asyncio.wait_for(make_agent(second, state, runtimes=("files",), files_dir=tmp_path / "files-b").run(),
                               10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "modelcache", "node", "--url", second.url, "--token", "t", "--node-id", second.node_id,
        "--runtime", "files", "--files-dir", str(tmp_path / "files-b"), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"modelcache: error: state dir {state} is in use by another node agent (pid {os.getpid()}): "
        "give each agent its own --state-dir (or state_dir in its config)"]

    assert await ran
    assert first.outcome(load) == ("available", None) and second.reports == []
    installed = json.loads((state / "installed.json").read_text())["installed"]
    assert [e["model_version_id"] for e in installed] == [load["model_version_id"]]


# -- 6. names Ollama cannot take -----------------------------------------------------------------------------


@pytest.mark.parametrize("runtimes", [("ollama",), ("ollama", "files")])
@pytest.mark.parametrize("version", ["1.0+cu121", "v" * 100])
async def test_a_version_ollama_cannot_name_fails_before_any_pull_or_goes_to_the_other_runtimes(
        make_cache, tmp_path, version, runtimes):
    cache = await make_cache()
    layer = cache.add_blob(os.urandom(100_000))
    config = cache.add_blob(b'{"model_format":"gguf"}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config["digest"],
                   "size": config["size_bytes"]},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": layer["digest"],
                    "size": layer["size_bytes"]}]}).encode()
    load = cache.add_load(model="tiny", version=version, artifact_type="ollama", files=[
        {"path": "manifest", **cache.add_blob(manifest)}, {"path": "blobs/sha256-x", **layer}])
    agent = make_agent(cache, tmp_path / "state", runtimes=runtimes, ollama_models=tmp_path / "ollama",
                       files_dir=tmp_path / "files")
    assert await run_until(agent, cache.all_ended)

    status, error = cache.outcome(load)
    assert not (tmp_path / "ollama").exists()
    if runtimes == ("ollama",):
        assert status == "failed" and error.startswith("invalid Ollama model name") and version in error, error
        assert cache.blob_requests == 0 and files_under(tmp_path / "state" / "blobs") == set()
    else:  # ollama is skipped, not the whole load: the folder runtime takes it
        assert (status, error) == ("available", None)
        assert (tmp_path / "files" / "acme" / "tiny" / version / "manifest").read_bytes() == manifest


# -- an answer the agent did not expect fails that load, not the agent ----------------------------------------


async def test_an_artifact_of_an_unexpected_shape_fails_its_load_and_the_next_load_installs(make_cache, tmp_path,
                                                                                          caplog):
    cache = await make_cache()
    odd = cache.add_load(model="odd", version="1", files=[{"path": "odd.gguf", **cache.add_blob(b"GGUF odd")}])
    del cache.artifacts[odd["artifact"]["id"]]["files"]  # the same dict under its digest too
    good = cache.add_load(model="good", version="1", files=[{"path": "good.gguf", **cache.add_blob(b"GGUF good")}])
    agent = make_agent(cache, tmp_path / "state", runtimes=("files",), files_dir=tmp_path / "files")
    assert await run_until(agent, cache.all_ended)

    status, error = cache.outcome(odd)
    assert status == "failed" and error.startswith("KeyError"), error
    assert cache.outcome(good) == ("available", None)
    assert (tmp_path / "files" / "acme" / "good" / "1" / "good.gguf").read_bytes() == b"GGUF good"
