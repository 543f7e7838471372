"""Eviction by policy after imports, and streamed uploads, through the real interfaces."""

import asyncio
import hashlib
import io
import os
import uuid

import pytest

from conftest import gguf_bytes, run_cli
from modelcache.digest import Digest

pytestmark = pytest.mark.registry

S = 64 * 1024


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


async def set_pref(db, key, value):
    from modelcache import preferences
    from modelcache.auth import Subject

    await preferences.set_preference(db, key, value, Subject.local())


async def state_of(db, digest):
    async with db.connection() as conn:
        cur = await conn.execute("SELECT state FROM model_artifacts WHERE sha256 = %s", (digest.hex,))
        return (await cur.fetchone())["state"]


async def test_lru_evicts_exactly_what_the_policy_says_and_keeps_pinned(
        db, store, server, http, make_file, make_artifact, make_token, running_apps):
    from modelcache.server.keys import CATALOG

    await set_pref(db, "models.cache.max_bytes", 3 * (S + 4) + 100)
    a = await make_artifact(make_file(prefix=b"GGUF", size=S), model="a")
    b = await make_artifact(make_file(prefix=b"GGUF", size=S), model="b")
    c = await make_artifact(make_file(prefix=b"GGUF", size=S), model="c")
    async with http.post(str(server.make_url(f"/v1/artifacts/{a.digest}/pin")),
                         headers=bearer(await make_token("operator"))) as r:
        assert r.status == 200
    await asyncio.sleep(0.01)
    async with http.get(str(server.make_url(f"/v1/blobs/{b.digest}")), headers=bearer(await make_token())) as r:
        assert r.status == 200  # b is now the most recently pulled
    await running_apps[0][CATALOG].flush_access()
    d = await make_artifact(make_file(prefix=b"GGUF", size=S), model="d")
    assert [await state_of(db, x.digest) for x in (a, b, c, d)] == ["promoted", "promoted", "evicted", "promoted"]
    assert not store.path_for(c.digest).exists() and store.path_for(a.digest).exists()
    async with db.connection() as conn:
        cur = await conn.execute("SELECT subject_type, details FROM model_audit_log "
                                 "WHERE action = 'model_artifact.evict'")
        [event] = await cur.fetchall()
        cur = await conn.execute("SELECT sum(size_bytes) AS used FROM blobs WHERE state = 'present'")
        used = (await cur.fetchone())["used"]
    assert event["subject_type"] == "policy" and event["details"]["freed_bytes"] == S + 4
    assert used <= 3 * (S + 4) + 100
    # an evicted artifact is not served, and its row stays
    await asyncio.sleep(0.3)
    async with http.get(str(server.make_url(f"/v1/blobs/{c.digest}")), headers=bearer(await make_token())) as r:
        assert r.status == 404


async def test_largest_first_skips_artifacts_a_node_is_loading(db, store, make_file, make_artifact):
    await set_pref(db, "models.cache.evict_policy", "largest_first")
    await set_pref(db, "models.cache.max_bytes", 4 * S)
    big = await make_artifact(make_file(prefix=b"GGUF", size=2 * S), model="big")
    mid = await make_artifact(make_file(prefix=b"GGUF", size=S), model="mid")
    node = uuid.uuid4()
    async with db.connection() as conn:
        await conn.execute("INSERT INTO nodes (id, name, updated_by) VALUES (%s, 'gpu-1', 'test')", (node,))
        await conn.execute(
            "INSERT INTO node_model_availability (node_id, model_version_id, status) "
            "SELECT %s, model_version_id, 'loading' FROM model_artifacts WHERE sha256 = %s",
            (node, big.digest.hex))
    small = await make_artifact(make_file(prefix=b"GGUF", size=S), model="small")
    assert await state_of(db, big.digest) == "promoted"  # being loaded: never evicted
    assert await state_of(db, mid.digest) == "evicted"
    assert await state_of(db, small.digest) == "promoted"


async def test_a_blob_shared_by_a_live_artifact_is_kept(db, store, tmp_path, make_artifact):
    shared = os.urandom(S)
    for name, own in (("one", b"1"), ("two", b"2")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "shared.bin").write_bytes(shared)
        (folder / "own.gguf").write_bytes(b"GGUF" + own * S)
    one = await make_artifact(tmp_path / "one", model="one")
    await make_artifact(tmp_path / "two", model="two")
    from modelcache import artifacts
    from modelcache.auth import Subject

    done = await artifacts.evict(db, store, str(one.digest), Subject.local(), reason="test")
    shared_digest = "sha256:" + hashlib.sha256(shared).hexdigest()
    assert shared_digest not in done.removed_blobs and done.freed_bytes == S + 4
    assert (store.blobs_dir / shared_digest[7:9] / shared_digest[7:]).exists()


async def test_policy_none_refuses_new_content_when_full(db, make_file, make_artifact, dsn, settings):
    await set_pref(db, "models.cache.evict_policy", "none")
    await set_pref(db, "models.cache.max_bytes", S + 10)
    await make_artifact(make_file(prefix=b"GGUF", size=S), model="first")
    src = make_file(prefix=b"GGUF", size=S)
    done = run_cli("import", str(src), "--model", "second", "--version", "1", "--dsn", dsn,
                   "--data-dir", str(settings.data_dir))
    assert done.returncode == 1
    assert "eviction policy is 'none'" in done.stderr and "do not fit" in done.stderr
    assert not any(p.is_file() for p in (settings.data_dir / "tmp").rglob("*"))


async def test_upload_streams_hashes_and_registers(server, http, make_token, store, db):
    data = gguf_bytes(n_floats=2 << 20)  # 8 MiB of tensor data behind a valid header
    async with http.post(str(server.make_url("/v1/imports")),
                         params={"model": "up", "version": "1", "filename": "up.gguf",
                                 "sha256": "sha256:" + hashlib.sha256(data).hexdigest()},
                         data=io.BytesIO(data), headers=bearer(await make_token("operator"))) as r:
        body = await r.json()
        assert r.status == 201, body
    assert body["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert body["artifact_type"] == "gguf" and body["state"] == "promoted" and body["source_uri"] == "upload:up.gguf"
    assert store.path_for(Digest.parse(body["digest"])).read_bytes() == data


async def test_upload_with_a_wrong_digest_keeps_nothing(server, http, make_token, store, db):
    wrong = "sha256:" + "0" * 64
    async with http.post(str(server.make_url("/v1/imports")), params={"model": "up", "version": "1",
                                                                       "sha256": wrong},
                         data=gguf_bytes(), headers=bearer(await make_token("operator"))) as r:
        body = await r.json()
        assert r.status == 422 and body["title"] == "Checksum mismatch" and wrong in body["detail"]
    assert not any(p.is_file() for p in store.tmp_dir.rglob("*")) and not any(store.blobs_dir.rglob("*/*"))
    async with db.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM model_artifacts")
        assert (await cur.fetchone())["n"] == 0


async def test_cli_upload_with_progress(server, db, make_token, make_file):
    src = make_file(gguf=True, size=3 << 20, name="model.gguf")
    env = {"MODELCACHE_URL": str(server.make_url("")).rstrip("/"), "MODELCACHE_TOKEN": await make_token()}
    done = await asyncio.to_thread(run_cli, "upload", str(src), "--model", "cli", "--version", "2", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert "cli:2" in done.stdout  # (the progress bar shows on a terminal only)
    async with db.connection() as conn:  # the record names the file that was uploaded
        cur = await conn.execute("SELECT source_uri FROM model_artifacts")
        assert (await cur.fetchone())["source_uri"] == "upload:model.gguf"


def test_a_large_upload_is_never_held_in_memory(dsn, tmp_path, make_file):
    """256 MiB through a real server process: its peak memory grows by far less than the body."""
    import subprocess
    import sys

    from test_embedded import free_port, wait_ready

    data = tmp_path / "data"
    secret = run_cli("token", "create", "--role", "operator", "--name", "up", "--dsn", dsn).stdout.split()[-1]
    src = make_file(gguf=True, size=256 << 20, name="big.gguf")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "modelcache", "serve", "--dsn", dsn, "--data-dir", str(data),
                             "--host", "127.0.0.1", "--port", str(port)], stderr=log)
    try:
        wait_ready(port, proc)
        before = _peak_rss_kib(proc.pid)
        env = {"MODELCACHE_URL": f"http://127.0.0.1:{port}", "MODELCACHE_TOKEN": secret}
        done = run_cli("upload", str(src), "--model", "big", "--version", "1", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
        grown = _peak_rss_kib(proc.pid) - before
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
    assert grown < 64 * 1024, f"the server's peak memory grew by {grown} KiB for a 256 MiB upload"


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
