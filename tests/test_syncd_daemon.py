"""The import daemon, running: real files dropped into a real import folder, a real PostgreSQL.

Each test starts a SyncDaemon on its own data dir and database, writes files
the way users' tools do, and looks at what a user would: the registry, the
store, the import folder and its ``.failed/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from modelcache.db import models
from modelcache.syncd.daemon import SyncDaemon
from conftest import gguf_bytes, safetensors_bytes

pytestmark = pytest.mark.registry

SETTLE = 0.5


@pytest.fixture
async def start_daemon(make_settings, db):
    started: list[SyncDaemon] = []

    async def start(**overrides) -> SyncDaemon:
        settings = make_settings(**{"syncd.settle_seconds": SETTLE, **overrides})
        daemon = SyncDaemon(settings, db)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


async def eventually(check, timeout: float = 15.0):
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s: {check}")
        await asyncio.sleep(0.05)


async def artifacts(db) -> list[dict]:
    async with db.connection() as conn:
        cur = await conn.execute(
            """
            SELECT a.id, a.sha256, a.size_bytes, a.artifact_type, a.state, v.version, v.capabilities,
                   m.name, m.vendor, m.description, v.default_parameters
              FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id
              JOIN models m ON m.id = v.model_id ORDER BY m.name, v.version, a.created_at
            """)
        return await cur.fetchall()


async def artifact_files(db, artifact_id, made: bool = False) -> list[tuple[str, str, int]]:
    """The files the import registered; ``made``: also those made for /v2 (``.ollama/``) after it."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT path, blob_digest, size_bytes FROM artifact_files WHERE artifact_id = %s "
            "AND (%s OR NOT starts_with(path, '.ollama/')) ORDER BY path",
            (artifact_id, made))
        return [(r["path"], r["blob_digest"], r["size_bytes"]) for r in await cur.fetchall()]


async def import_events(db) -> list[dict]:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT * FROM model_audit_log WHERE action = 'model_artifact.import' "
                                 "ORDER BY created_at DESC, id DESC")
        return await cur.fetchall()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(path: Path, data: bytes) -> Path:
    """Write a file into place at once (staged beside it under a hidden name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.drop"
    temp.write_bytes(data)
    os.rename(temp, path)
    return path


def stored(daemon: SyncDaemon, hexdigest: str) -> Path:
    return daemon.store.blobs_dir / hexdigest[:2] / hexdigest


async def test_a_file_copied_slowly_in_chunks_is_imported_once_whole(start_daemon, db):
    daemon = await start_daemon()
    data = gguf_bytes(n_floats=64 * 1024)
    path = daemon.import_dir / "llama3" / "8b" / "slow.gguf"
    path.parent.mkdir(parents=True)
    chunk = len(data) // 6 + 1
    for i in range(0, len(data), chunk):
        # reopened for each chunk, as a resumable copy does; each pause is shorter than the settle time
        with open(path, "ab") as f:
            f.write(data[i:i + chunk])
        await asyncio.sleep(SETTLE / 5)
    [row] = await eventually(lambda: artifacts(db))
    assert (row["name"], row["version"], row["sha256"], row["size_bytes"]) == ("llama3", "8b", sha256(data), len(data))
    assert row["capabilities"]["context_length"] == 8192 and row["capabilities"]["quantization"] == "Q4_K_M"
    await eventually(lambda: not path.exists())
    assert stored(daemon, sha256(data)).read_bytes() == data
    assert os.listdir(daemon.import_dir / ".failed") == []
    [event] = await import_events(db)
    assert (event["subject_type"], event["outcome"], event["resource"]) == ("syncd", "created", f"sha256:{sha256(data)}")


async def test_a_file_held_open_by_its_writer_waits_until_it_is_closed(start_daemon, db):
    daemon = await start_daemon()
    data = gguf_bytes()
    path = daemon.import_dir / "open.gguf"
    with open(path, "wb") as writer:
        writer.write(data)
        writer.flush()
        await asyncio.sleep(SETTLE * 4)  # long settled, but a writer still holds it
        assert path.exists() and await artifacts(db) == []
    [row] = await eventually(lambda: artifacts(db))
    assert (row["name"], row["version"], row["sha256"]) == ("open", "latest", sha256(data))


async def test_a_file_renamed_into_place_like_rsync_is_imported_and_its_temp_name_is_not(start_daemon, db):
    daemon = await start_daemon()
    data = gguf_bytes()
    final = daemon.import_dir / "meta" / "llama3" / "8b-q4" / "model.gguf"
    final.parent.mkdir(parents=True)
    temp = final.parent / ".model.gguf.Xa8k2Q"  # rsync's hidden temp name
    with open(temp, "wb") as f:
        f.write(data[:1000])
    await asyncio.sleep(SETTLE * 3)
    assert temp.exists() and await artifacts(db) == [] and os.listdir(daemon.import_dir / ".failed") == []
    with open(temp, "ab") as f:
        f.write(data[1000:])
    os.utime(temp, (1_600_000_000, 1_600_000_000))  # rsync -t sets the source's old mtime
    os.rename(temp, final)
    [row] = await eventually(lambda: artifacts(db))
    assert (row["vendor"], row["name"], row["version"], row["sha256"]) == ("meta", "llama3", "8b-q4", sha256(data))
    await eventually(lambda: not final.exists())


async def test_a_malformed_gguf_goes_to_failed_with_its_reason(start_daemon, db):
    daemon = await start_daemon()
    data = gguf_bytes(n_floats=4096)
    drop(daemon.import_dir / "broken" / "1" / "cut.gguf", data[: len(data) // 2])
    failed = daemon.import_dir / ".failed" / "broken" / "1"
    await eventually(lambda: (failed / "cut.gguf.error.json").exists() and (failed / "cut.gguf").exists())
    assert not (daemon.import_dir / "broken" / "1" / "cut.gguf").exists()
    assert (failed / "cut.gguf").read_bytes() == data[: len(data) // 2]  # moved, untouched
    record = json.loads((failed / "cut.gguf.error.json").read_text())
    assert "truncated GGUF file: tensor 'token_embd.weight' ends at byte" in record["reason"]
    assert record["file"] == "broken/1/cut.gguf" and record["error"] == "ImportRejected" and record["time"]
    assert await artifacts(db) == []
    assert [p for p in daemon.store.blobs_dir.rglob("*") if p.is_file()] == []
    [event] = await import_events(db)
    assert (event["subject_type"], event["outcome"]) == ("syncd", "failed") and "truncated" in event["reason"]


async def test_duplicates_same_name_is_a_no_op_another_name_fails_naming_the_artifact(start_daemon, db):
    daemon = await start_daemon()
    data = gguf_bytes()
    drop(daemon.import_dir / "tiny" / "1" / "a.gguf", data)
    [first] = await eventually(lambda: artifacts(db))

    drop(daemon.import_dir / "tiny" / "1" / "again.gguf", data)  # same bytes, same model and version
    await eventually(lambda: not (daemon.import_dir / "tiny" / "1" / "again.gguf").exists())
    assert await artifacts(db) == [first]

    drop(daemon.import_dir / "other" / "2" / "copy.gguf", data)  # same bytes, another model
    error_file = daemon.import_dir / ".failed" / "other" / "2" / "copy.gguf.error.json"
    await eventually(error_file.exists)
    reason = json.loads(error_file.read_text())["reason"]
    assert f"already artifact {first['id']} of tiny:1" in reason
    assert await artifacts(db) == [first]
    outcomes = sorted(e["outcome"] for e in await import_events(db))
    assert outcomes == ["created", "failed", "unchanged"]


async def test_a_snapshot_folder_becomes_one_artifact_of_several_blobs(start_daemon, db):
    daemon = await start_daemon()
    folder = daemon.import_dir / "acme" / "tiny-chat" / "1.0"
    contents = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}).encode(),
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}).encode(),
        "model-00001-of-00002.safetensors": safetensors_bytes({"a": ("F16", [64, 64])}),
        "model-00002-of-00002.safetensors": safetensors_bytes({"b": ("F32", [64])}),
        "model.safetensors.index.json": json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode(),
    }
    order = ["model-00001-of-00002.safetensors", "config.json", "model.safetensors.index.json",
             "tokenizer_config.json"]
    for name in order:  # one shard still missing: the index names it, so the folder waits
        drop(folder / name, contents[name])
    await asyncio.sleep(SETTLE * 3)
    assert await artifacts(db) == [] and (folder / "config.json").exists()
    drop(folder / "model-00002-of-00002.safetensors", contents["model-00002-of-00002.safetensors"])

    [row] = await eventually(lambda: artifacts(db))
    assert (row["vendor"], row["name"], row["version"], row["artifact_type"]) == ("acme", "tiny-chat", "1.0",
                                                                                  "safetensors")
    caps = row["capabilities"]
    assert caps["architecture"] == "LlamaForCausalLM" and caps["context_length"] == 2048
    assert caps["parameter_count"] == 64 * 64 + 64 and caps["chat_template"] is True
    files = await artifact_files(db, row["id"])
    assert [(p, d, s) for p, d, s in files] == sorted(
        (name, f"sha256:{sha256(data)}", len(data)) for name, data in contents.items())
    for _, digest, _ in files:
        assert stored(daemon, digest[7:]).exists()
    await eventually(lambda: not folder.exists())


async def test_a_folder_with_modelcache_json_is_imported_as_named(start_daemon, db):
    daemon = await start_daemon()
    folder = daemon.import_dir / "bundle"
    parts = {"part-a.gguf": gguf_bytes(), "notes/README.txt": b"how to use it\n"}
    drop(folder / "modelcache.json", json.dumps({
        "name": "bundled", "version": "2", "artifact_type": "gguf", "files": sorted(parts),
        "description": "two files", "default_parameters": {"temperature": 0.2}}).encode())
    for name, data in parts.items():
        drop(folder / name, data)
    [row] = await eventually(lambda: artifacts(db))
    assert (row["name"], row["version"], row["description"]) == ("bundled", "2", "two files")
    assert row["default_parameters"] == {"temperature": 0.2}
    assert [p for p, _, _ in await artifact_files(db, row["id"])] == sorted(parts)  # modelcache.json is not a file
    await eventually(lambda: not folder.exists())

    extra = daemon.import_dir / "extra"
    drop(extra / "modelcache.json", json.dumps({"name": "x", "files": ["a.gguf"]}).encode())
    drop(extra / "a.gguf", gguf_bytes())
    drop(extra / "stray.gguf", gguf_bytes())
    error_file = daemon.import_dir / ".failed" / "extra.error.json"
    await eventually(error_file.exists)
    assert "the folder also holds stray.gguf" in json.loads(error_file.read_text())["reason"]
    assert sorted(os.listdir(daemon.import_dir / ".failed" / "extra")) == ["a.gguf", "modelcache.json", "stray.gguf"]


async def test_a_sidecar_names_the_artifact_and_no_key_someone_set_is_overwritten(start_daemon, db):
    async with db.transaction() as conn:  # an operator already described this version
        model_id = await models.upsert_model(conn, "chat", "acme", "token:ops")
        version_id = await models.upsert_version(conn, model_id, "3")
        await models.merge_version_metadata(conn, version_id, {"architecture": "as the operator said"}, None)
    daemon = await start_daemon()
    path = daemon.import_dir / "whatever-name.gguf"
    drop(path.with_name(path.name + ".json"), json.dumps({
        "name": "chat", "vendor": "acme", "version": "3",
        "capabilities": {"context_length": 999, "tool_use": True}}).encode())
    drop(path, gguf_bytes(context_length=8192))
    [row] = await eventually(lambda: artifacts(db))
    assert (row["vendor"], row["name"], row["version"]) == ("acme", "chat", "3")
    caps = row["capabilities"]
    assert caps["architecture"] == "as the operator said"  # the operator's value stays
    assert caps["context_length"] == 999 and caps["tool_use"] is True  # the sidecar wins over the header
    assert caps["quantization"] == "Q4_K_M"  # the header fills in the rest
    await eventually(lambda: os.listdir(daemon.import_dir) == [".failed"])  # file and sidecar are gone


async def test_files_placed_while_it_was_down_are_imported_and_ignored_names_are_left(start_daemon, settings, db):
    import_dir = settings.import_dir
    import_dir.mkdir(parents=True)
    waiting = {name: drop(import_dir / name, gguf_bytes()) for name in ("one.gguf", "two.gguf")}
    ignored = [drop(import_dir / name, gguf_bytes()) for name in (".hidden.gguf", "part.gguf.partial", "x.tmp")]
    await start_daemon()
    rows = await eventually(lambda: _at_least(artifacts(db), 2))
    assert sorted(r["name"] for r in rows) == ["one", "two"]
    await eventually(lambda: not any(p.exists() for p in waiting.values()))
    await asyncio.sleep(SETTLE * 2)
    assert all(p.exists() for p in ignored)
    assert len(await artifacts(db)) == 2 and os.listdir(import_dir / ".failed") == []


async def test_polling_mode_imports_too(start_daemon, db):
    daemon = await start_daemon(**{"syncd.force_polling": True})
    data = gguf_bytes()
    drop(daemon.import_dir / "polled.gguf", data)
    [row] = await eventually(lambda: artifacts(db))
    assert row["sha256"] == sha256(data)


@pytest.mark.parametrize("name,sidecar,reason", [
    ("bad name.gguf", None, "invalid model name 'bad name'"),
    ("m.gguf", b'{"name": "m", "verison": "1"}', "unknown key 'verison' in the sidecar"),
    ("n.gguf", b'{"name": "n", ', "the sidecar is not valid JSON"),
])
async def test_a_bad_name_or_sidecar_fails_with_the_file_and_sidecar_kept(start_daemon, db, name, sidecar, reason):
    daemon = await start_daemon()
    data = gguf_bytes()
    if sidecar is not None:
        drop(daemon.import_dir / f"{name}.json", sidecar)
    drop(daemon.import_dir / name, data)
    failed = daemon.import_dir / ".failed"
    await eventually(lambda: (failed / f"{name}.error.json").exists())
    assert reason in json.loads((failed / f"{name}.error.json").read_text())["reason"]
    assert (failed / name).read_bytes() == data
    if sidecar is not None:
        assert (failed / f"{name}.json").read_bytes() == sidecar
    assert await artifacts(db) == []
    [event] = await import_events(db)
    assert (event["subject_type"], event["outcome"]) == ("syncd", "failed")


async def test_a_second_failure_of_the_same_name_keeps_the_first(start_daemon, db):
    daemon = await start_daemon()
    failed = daemon.import_dir / ".failed"
    drop(daemon.import_dir / "junk.bin", b"not a model, first")
    await eventually(lambda: (failed / "junk.bin").exists())
    drop(daemon.import_dir / "junk.bin", b"not a model, second")
    await eventually(lambda: len(list(failed.rglob("junk.bin"))) == 2)
    assert sorted(p.read_bytes() for p in failed.rglob("junk.bin")) == [b"not a model, first", b"not a model, second"]
    assert len(list(failed.rglob("junk.bin.error.json"))) == 2


async def test_a_hard_linked_file_is_copied_not_taken(start_daemon, db, tmp_path):
    daemon = await start_daemon()
    data = gguf_bytes()
    outside = tmp_path / "mine.gguf"
    outside.write_bytes(data)
    os.link(outside, daemon.import_dir / "linked.gguf")
    [row] = await eventually(lambda: artifacts(db))
    assert row["sha256"] == sha256(data)
    await eventually(lambda: not (daemon.import_dir / "linked.gguf").exists())
    blob = stored(daemon, sha256(data))
    assert os.stat(blob).st_ino != os.stat(outside).st_ino  # the user's file is not the blob
    assert os.access(outside, os.W_OK) and outside.read_bytes() == data


async def _at_least(rows_coro, n: int):
    rows = await rows_coro
    return rows if len(rows) >= n else None


async def test_a_file_that_changes_while_it_is_hashed_is_imported_as_it_ends_up(start_daemon, db):
    daemon = await start_daemon()
    n_floats = 1 << 26  # 256 MiB of holes: long enough to be caught while it is hashed
    header = gguf_bytes(n_floats=n_floats, data=b"")
    path = daemon.import_dir / "growing.gguf"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n_floats * 4)
    await eventually(lambda: any(daemon.store.tmp_dir.glob("*.partial")), timeout=15)  # linked into tmp/, hashing
    with open(path, "ab") as f:
        f.write(b"appended while it was being hashed")
    [row] = await eventually(lambda: artifacts(db), timeout=30)
    expected = hashlib.sha256(header)
    expected.update(bytes(n_floats * 4))
    expected.update(b"appended while it was being hashed")
    assert row["sha256"] == expected.hexdigest()
    assert sorted(e["outcome"] for e in await import_events(db)) == ["created", "failed"]

    async def every_blob_held() -> bool:
        """The store holds exactly the artifact's blobs (the /v2 manifests are made right after the
        import registers: their blobs are committed a moment before their rows)."""
        held = {stored(daemon, d[len("sha256:"):]) for _, d, _ in await artifact_files(db, row["id"], made=True)}
        on_disk = {p for p in daemon.store.blobs_dir.rglob("*") if p.is_file()}
        return stored(daemon, row["sha256"]) in held and on_disk == held

    await eventually(every_blob_held)
    assert os.listdir(daemon.import_dir / ".failed") == []


async def test_a_symbolic_link_is_not_followed_but_moved_to_failed(start_daemon, db, tmp_path):
    daemon = await start_daemon()
    target = tmp_path / "elsewhere.gguf"
    target.write_bytes(gguf_bytes())
    os.symlink(target, daemon.import_dir / "link.gguf")
    error_file = daemon.import_dir / ".failed" / "link.gguf.error.json"
    await eventually(error_file.exists)
    assert "a symbolic link" in json.loads(error_file.read_text())["reason"]
    assert (daemon.import_dir / ".failed" / "link.gguf").is_symlink() and target.exists()
    assert await artifacts(db) == []


async def test_an_import_that_takes_longer_than_progress_seconds_logs_its_progress(start_daemon, db, caplog):
    caplog.set_level(logging.INFO, logger="modelcache.syncd.daemon")
    daemon = await start_daemon(**{"syncd.progress_seconds": 0.01})  # 5 s by default: a 64 MiB file stands in
    n_floats = 1 << 24
    header = gguf_bytes(n_floats=n_floats, data=b"")
    path = daemon.import_dir / "slow.gguf"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n_floats * 4)
    size = path.stat().st_size
    [row] = await eventually(lambda: artifacts(db), timeout=30)
    assert row["size_bytes"] == size
    line = re.compile(rf"importing {re.escape(str(path))}: (\d+) of {size} bytes \(\d+%\), \d+ MB/s")
    progress = [m for r in caplog.records if (m := line.fullmatch(r.getMessage()))]
    assert progress, [r.getMessage() for r in caplog.records]
    done = [int(m.group(1)) for m in progress]
    assert done == sorted(done) and 0 < done[0] and done[-1] <= size


@pytest.mark.parametrize("linked", [".failed", ".failed/acme"])
async def test_a_failed_folder_made_a_symbolic_link_is_not_written_through(start_daemon, db, tmp_path, caplog, linked):
    """Whoever may drop files could point .failed (or a folder in it) elsewhere: nothing is written
    there, the file stays in place with a log line naming the link, and it is moved once the link is gone."""
    daemon = await start_daemon()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = daemon.import_dir / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir():
        link.rmdir()  # the daemon made an empty .failed at start
    os.symlink(elsewhere, link)
    data = gguf_bytes(n_floats=4096)
    drop(daemon.import_dir / "acme" / "1" / "cut.gguf", data[: len(data) // 2])
    await eventually(lambda: "a symbolic link is not followed" in caplog.text)
    assert list(elsewhere.iterdir()) == []
    assert (daemon.import_dir / "acme" / "1" / "cut.gguf").exists() and f"{link} is not a folder" in caplog.text
    os.unlink(link)
    moved = daemon.import_dir / ".failed" / "acme" / "1" / "cut.gguf"
    await eventually(lambda: moved.exists() and moved.with_name("cut.gguf.error.json").exists(), timeout=15)
    assert list(elsewhere.iterdir()) == []


def test_a_full_disk_while_moving_to_failed_leaves_the_file_in_place_and_no_half_reason(make_tmpfs):
    """move_to_failed on a real filesystem with no room: it raises (the daemon logs it and tries again
    later), the file is where it was, and no half-written reason file is left behind."""
    from modelcache.syncd.failed import list_failed, move_to_failed

    import_dir = make_tmpfs(64 << 10)
    path = import_dir / "acme" / "1" / "cut.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF cut short")
    (import_dir / ".failed").mkdir()
    fd = os.open(import_dir / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # every block taken
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        move_to_failed(import_dir, path, (), "truncated GGUF file: " + "x" * 8000, "ImportRejected")
    assert path.read_bytes() == b"GGUF cut short"
    assert [p for p in (import_dir / ".failed").rglob("*") if p.is_file()] == []
    (import_dir / "filler").unlink()
    target = move_to_failed(import_dir, path, (), "truncated GGUF file", "ImportRejected")
    assert target == import_dir / ".failed" / "acme" / "1" / "cut.gguf" and not path.exists()
    assert [r["reason"] for r in list_failed(import_dir)] == ["truncated GGUF file"]
