"""The embedded PostgreSQL: started under the data dir, shared with CLI verbs, reused, stopped on exit."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil

from conftest import run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir, port, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "modelcache", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(port, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def postmasters(data_dir) -> list:
    pg = str(data_dir / "pg")
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "postgres" and p.info["cmdline"] and pg in " ".join(p.info["cmdline"])]


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_serve_with_embedded_postgres_shares_reuses_and_stops_it(tmp_path, make_file):
    data = tmp_path / "data"
    port = free_port()
    src = make_file(gguf=True, size=4096)
    proc = start(data, port, "--config", str(_json_logs(tmp_path)))
    try:
        wait_ready(port, proc)
        assert (data / "pg" / "PG_VERSION").exists()
        # CLI verbs on the same data dir join the running instance
        done = run_cli("import", str(src), "--model", "m", "--version", "1", "--data-dir", str(data))
        assert done.returncode == 0, done.stderr
        digest = done.stdout.strip().splitlines()[-1]
        token = run_cli("token", "create", "--role", "reader", "--name", "t", "--data-dir", str(data))
        secret = token.stdout.strip().splitlines()[-1]
        assert postmasters(data), "postmaster should still run for the server"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/blobs/{digest}",
                                         headers={"Authorization": f"Bearer {secret}", "Range": "bytes=0-99"})
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    assert r.status == 206 and r.read() == src.read_bytes()[:100]
                    break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        err = stop(proc)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("embedded PostgreSQL" in e["message"] for e in lines)
    access = [e["message"] for e in lines if e["logger"] == "modelcache.access" and digest in e["message"]]
    assert access and "who=token:t" in access[0] and "range=0-99" in access[0] and "bytes=100" in access[0]
    deadline = time.monotonic() + 10
    while postmasters(data) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not postmasters(data), "the embedded PostgreSQL must stop with the last modelcache process"

    # restart: the same cluster, the same registry
    port = free_port()
    proc = start(data, port)
    try:
        wait_ready(port, proc)
        done = run_cli("db", "status", "--data-dir", str(data))
        state = re.match(r"database: (\d+); code: (\d+); pending: 0$", done.stdout.splitlines()[0])
        assert state and state.group(1) == state.group(2), done.stdout
    finally:
        stop(proc)


def _json_logs(tmp_path):
    path = tmp_path / "mc.toml"
    path.write_text('[log]\nformat = "json"\n')
    return path
