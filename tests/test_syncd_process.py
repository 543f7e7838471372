"""``modelcache syncd`` as a real process: killed with SIGKILL mid-hash, stopped with SIGTERM/SIGINT."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import gguf_bytes

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

BIG_FLOATS = 1 << 28  # 1 GiB of tensor data: about 0.7 s of hashing here, long enough to be caught at it


class Daemon:
    """``python -m modelcache syncd`` in a subprocess, its log in a file."""

    def __init__(self, data_dir: Path, dsn: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
        env["MODELCACHE_SYNCD_SETTLE_SECONDS"] = "0.3"
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "syncd", "--dsn", dsn, "--data-dir", str(data_dir),
             "--host", "cache.example.org", "--port", "18085"],  # DESIGN: syncd takes them, as run and serve do
            stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.proc.poll() is None, f"syncd exited with {self.proc.returncode}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {text!r} in the log after {timeout}s:\n{self.log.read_text()}"
            time.sleep(0.02)

    def stop(self, sig: int, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()


def artifact_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT sha256, size_bytes FROM model_artifacts").fetchall()


def held_blobs(dsn: str, blobs_dir: Path) -> list[Path]:
    """The blob files the registry lists (an import's, and those made for /v2 after it)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT DISTINCT blob_digest FROM artifact_files").fetchall()
    return sorted(blobs_dir / "sha256" / d[7:9] / d[7:] for (d,) in rows)


def import_outcomes(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT outcome FROM model_audit_log WHERE action = 'model_artifact.import'").fetchall()
    return sorted(r[0] for r in rows)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def big_sparse_gguf(path: Path) -> tuple[str, int]:
    """A valid GGUF of 1 GiB whose tensor data is a hole (no disk used); returns its sha256 and size."""
    header = gguf_bytes(n_floats=BIG_FLOATS, data=b"")
    size = len(header) + BIG_FLOATS * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    h = hashlib.sha256(header)
    zeros = bytes(1 << 24)
    left = size - len(header)
    while left:
        n = min(left, len(zeros))
        h.update(zeros[:n])
        left -= n
    return h.hexdigest(), size


def test_sigkill_mid_hash_leaves_no_partial_blob_and_the_file_is_imported_once_after_restart(tmp_path, dsn):
    data_dir = tmp_path / "data"
    hexdigest, size = big_sparse_gguf(data_dir / "import" / "big" / "1" / "model.gguf")
    tmp_dir, blobs_dir = data_dir / "tmp", data_dir / "blobs"

    first = Daemon(data_dir, dsn, tmp_path / "first.log")
    deadline = time.monotonic() + 30
    while not any(tmp_dir.glob("*.partial")):  # the file is linked into tmp/ and being hashed
        assert first.proc.poll() is None, first.log.read_text()
        assert time.monotonic() < deadline, f"the import never started:\n{first.log.read_text()}"
        time.sleep(0.002)
    first.proc.kill()
    assert first.wait() == -signal.SIGKILL
    assert files_under(tmp_dir), "killed after the hash finished: the test did not test a mid-hash kill"
    assert files_under(blobs_dir) == []  # no partial blob
    assert artifact_rows(dsn) == []  # no row, so none without its blob
    assert (data_dir / "import" / "big" / "1" / "model.gguf").stat().st_size == size  # the user's file is intact

    second = Daemon(data_dir, dsn, tmp_path / "second.log")
    deadline = time.monotonic() + 60
    while not artifact_rows(dsn):
        assert second.proc.poll() is None, second.log.read_text()
        assert time.monotonic() < deadline, f"not imported after the restart:\n{second.log.read_text()}"
        time.sleep(0.05)
    second.wait_for_log("imported ")
    assert "not serving; what this process stores is served by http://cache.example.org:18085" in second.log.read_text()
    assert artifact_rows(dsn) == [(hexdigest, size)]
    assert import_outcomes(dsn) == ["created"]
    blob = blobs_dir / "sha256" / hexdigest[:2] / hexdigest
    assert blob in held_blobs(dsn, blobs_dir) and blob.stat().st_size == size
    assert files_under(blobs_dir) == held_blobs(dsn, blobs_dir)  # no other blob
    assert files_under(tmp_dir) == []  # the leftover temp file was removed at start
    assert files_under(data_dir / "import") == []
    assert "removed leftover temp file" in second.log.read_text()
    assert second.stop(signal.SIGTERM) == 0
    assert "stopped watching the import folder" in second.log.read_text()


def test_sigint_stops_the_daemon_cleanly(tmp_path, dsn):
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, dsn, tmp_path / "syncd.log")
    daemon.wait_for_log("watching the import folder")
    (data_dir / "import" / "small.gguf").write_bytes(gguf_bytes())
    daemon.wait_for_log("imported ")
    assert daemon.stop(signal.SIGINT) == 0
    log = daemon.log.read_text()
    assert "Traceback" not in log and "stopped watching the import folder" in log


def test_sigterm_mid_hash_lets_the_import_finish_then_exits_0(tmp_path, dsn):
    data_dir = tmp_path / "data"
    hexdigest, size = big_sparse_gguf(data_dir / "import" / "model.gguf")
    daemon = Daemon(data_dir, dsn, tmp_path / "syncd.log")
    tmp_dir = data_dir / "tmp"
    deadline = time.monotonic() + 30
    while not any(tmp_dir.glob("*.partial")):
        assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.002)
    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log.read_text()
    assert "waiting for 1 import(s) in progress to finish" in log
    assert artifact_rows(dsn) == [(hexdigest, size)]
    assert files_under(data_dir / "import") == [] and files_under(tmp_dir) == []
