"""Clean answers for the unlucky: a full disk, a denial with NUL in its path, forged log lines,
unexpected failures counted, idle and trickling connections closed, parser 400s as one line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import gguf_bytes, run_cli
from test_embedded import free_port, wait_ready

pytestmark = pytest.mark.registry


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def small_disk(make_tmpfs):
    """A 4 MiB tmpfs as the data dir: a real filesystem that fills up."""
    return make_tmpfs(4 << 20)


def _leftovers(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in (data / "tmp").rglob("*") if p.is_file())


async def test_a_full_disk_during_an_upload_is_a_507_problem_and_keeps_nothing(start_server, make_settings, http,
                                                                               make_token, small_disk, db):
    server = await start_server(make_settings(**{"storage.data_dir": str(small_disk)}))
    body = gguf_bytes(n_floats=(8 << 20) // 4)  # 8 MiB into 4 MiB
    async with http.post(str(server.make_url("/v1/imports")), params={"model": "big", "version": "1"},
                         data=io.BytesIO(body), headers=bearer(await make_token("operator"))) as r:
        problem = await r.json(content_type=None)
    assert r.status == 507, problem
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert problem["title"] == "Insufficient storage"
    assert f"no room left on the filesystem of {small_disk}" in problem["detail"]
    assert _leftovers(small_disk) == []
    assert list((small_disk / "blobs" / "sha256").iterdir()) == []
    async with db.connection() as conn:
        assert (await (await conn.execute("SELECT count(*) AS n FROM blobs")).fetchone())["n"] == 0
    await server.close()


def test_a_full_disk_during_an_import_is_one_line_on_stderr(dsn, small_disk, make_file):
    src = make_file(content=gguf_bytes(n_floats=(8 << 20) // 4), name="big.gguf")
    done = run_cli("import", str(src), "--model", "big", "--version", "1", "--dsn", dsn, "--data-dir",
                   str(small_disk))
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("modelcache: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"modelcache: error: no room left on the filesystem of {small_disk}"), errors
    # besides the error, at most the import road's own one-line warning of the failed import
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert _leftovers(small_disk) == []
    assert src.stat().st_size > 8 << 20  # the user's file is untouched


async def test_a_denial_with_nul_in_its_path_is_403_and_audited(server, http, make_token, db):
    node = await make_token("node", name="node-nul")
    async with http.patch(str(server.make_url("/v1/versions/%00")), json={}, headers=bearer(node)) as r:
        problem = await r.json(content_type=None)
    assert r.status == 403, problem
    async with db.connection() as conn:
        rows = await (await conn.execute("SELECT resource, decision FROM model_audit_log WHERE subject_id = "
                                         "'node-nul'")).fetchall()
    assert rows == [{"resource": "/v1/versions/\\x00", "decision": "deny"}]


async def test_an_unexpected_failure_is_a_counted_500_in_the_protocols_form(server, http, make_file, make_artifact,
                                                                             make_token, store):
    """A blob whose file became a directory: opening it fails in a way no handler expects."""
    result = await make_artifact(make_file(content=gguf_bytes(n_floats=256), name="t.gguf"))
    path = store.path_for(result.digest)
    path.chmod(0o644)
    path.unlink()
    path.mkdir()
    token = await make_token("reader")
    for url, protocol in ((f"/v1/blobs/{result.digest}", "problem"), (f"/v2/meta/tiny/blobs/{result.digest}", "oci")):
        async with http.get(str(server.make_url(url)), headers=bearer(token)) as r:
            body = await r.json(content_type=None)
        assert r.status == 500, body
        if protocol == "problem":
            assert r.headers["Content-Type"].startswith("application/problem+json")
            assert body["status"] == 500 and "unexpected error" in body["detail"]
        else:
            assert body["errors"][0]["code"] == "UNKNOWN"
    async with http.get(str(server.make_url("/metrics"))) as r:
        metrics = await r.text()
    assert 'modelcache_http_requests_total{method="GET",status="500"} 2.0' in metrics


class Serve:
    """``modelcache serve`` on the test database, its text log in a file, a short keep-alive bound."""

    def __init__(self, tmp_path: Path, dsn: str, keepalive: float) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        conf = tmp_path / "mc.toml"
        conf.write_text(f'[log]\nformat = "text"\n[server]\nkeepalive_timeout = {keepalive}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelcache", "serve", "--config", str(conf), "--dsn", dsn, "--data-dir",
                 str(tmp_path / "data"), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=log, env=env)

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(60)
        return self.log.read_text()


@pytest.fixture
def serve(tmp_path, dsn):
    srv = Serve(tmp_path, dsn, keepalive=1.5)
    try:
        wait_ready(srv.port, srv.proc)
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_request_values_cannot_forge_log_lines_and_parser_400s_are_one_warning(serve, dsn):
    node = run_cli("token", "create", "--role", "node", "--name", "node-1", "--dsn", dsn).stdout.split()[-1]
    forged = "/v1/versions/x%0D%0A2099-01-01T00:00:00.000Z%20INFO%20modelcache.access:%20FORGED"
    request = (f"PATCH {forged} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {node}\r\nContent-Length: 2\r\n"
               "Connection: close\r\n\r\n{}").encode()
    assert serve.raw(request).startswith(b"HTTP/1.1 403")
    upload = ("POST /v1/imports?model=m&version=1&filename=a%0AFORGED HTTP/1.1\r\nHost: x\r\n"
              "Content-Length: 1\r\nConnection: close\r\n\r\nx").encode()
    assert serve.raw(upload).startswith(b"HTTP/1.1 401")
    bad = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon in this header line\r\n\r\n"
    assert serve.raw(bad).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    time.sleep(1)  # the access log is written twice a second
    log = serve.stop()
    lines = log.splitlines()
    assert not [line for line in lines if "FORGED" in line and not re.match(r"\d{4}-\d\d-\d\dT", line)], log
    assert not [line for line in lines if line.startswith("2099")], log
    assert any("x\\r\\n2099-01-01" in line and "denied PATCH" in line for line in lines), log
    refused = [line for line in lines if "refused a malformed request from 127.0.0.1" in line]
    assert len(refused) == 1 and " WARNING " in refused[0], log
    assert "Traceback" not in log and " ERROR " not in log, log


def test_idle_and_trickling_connections_are_closed_within_the_keepalive_bound(serve):
    """keepalive_timeout = 1.5 s: a connection that never finishes its headers is closed by then."""
    bound, slack = 1.5, 3.0
    partial = [b"", b"GET /v1/mo", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"]
    sockets = []
    started = time.monotonic()
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", serve.port), timeout=bound + slack)
        s.sendall(partial[i % len(partial)])
        sockets.append(s)
    trickler = socket.create_connection(("127.0.0.1", serve.port), timeout=bound + slack)
    closed_after = []
    try:
        for byte in b"GET /v1/models HTTP/1.1\r\n":  # one byte every 0.2 s: never finishes in time
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - started > bound + slack:
                break
            time.sleep(0.2)
        for s in [*sockets, trickler]:
            try:
                data = s.recv(65536)  # b"" once the server closed it; a timeout fails the test
            except ConnectionResetError:
                data = b""
            assert data == b"", data
            closed_after.append(time.monotonic() - started)
    finally:
        for s in [*sockets, trickler]:
            s.close()
    assert max(closed_after) < bound + slack, closed_after
    # a connection that asks in time is answered as before
    assert serve.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


async def test_denied_blob_pulls_are_counted_and_audited_in_batches(server, http, make_file, make_artifact,
                                                                    make_token, db):
    """50 denied pulls over /v1, /v2 and /hf: counted at once, audited as a few rows with counts."""
    from modelcache.server.blobs.denials import DENIALS

    async with db.connection() as conn:  # imports stay staged: readers are denied them
        await conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                           "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    staged = await make_artifact(make_file(content=gguf_bytes(n_floats=256), name="s.gguf"))
    reader = await make_token("reader", name="reader-1")
    urls = [(f"/v1/blobs/{staged.digest}", bearer(reader), 403), (f"/v1/blobs/{staged.digest}", {}, 401),
            (f"/v2/meta/tiny/blobs/{staged.digest}", bearer(reader), 403),
            ("/hf/acme/tiny/resolve/main/config.json", bearer("mc_not_a_token"), 401)]
    for i in range(50):
        url, headers, status = urls[i % len(urls)]
        async with http.get(str(server.make_url(url)), headers=headers) as r:
            assert r.status == status, (url, await r.text())

    async def denied_rows() -> list[dict]:
        async with db.connection() as conn:
            return await (await conn.execute(
                "SELECT subject_type, subject_id, resource, reason, details FROM model_audit_log "
                "WHERE action = 'blob.pull' AND decision = 'deny' ORDER BY created_at")).fetchall()

    before = await denied_rows()  # nothing written per request (a timer flush may have run once)
    assert sum(row["details"]["count"] for row in before) < 50 and len(before) <= 4
    async with http.get(str(server.make_url("/metrics"))) as r:
        metrics = await r.text()
    assert 'modelcache_blob_pulls_denied_total{status="403"} 25.0' in metrics, metrics
    assert 'modelcache_blob_pulls_denied_total{status="401"} 25.0' in metrics
    await server.app[DENIALS].flush()
    rows = await denied_rows()
    assert sum(row["details"]["count"] for row in rows) == 50
    assert len(rows) <= 8, rows  # one per subject, resource, status and reason per flush
    by = {(r["subject_id"], r["resource"], r["details"]["status"]) for r in rows}
    assert ("reader-1", str(staged.digest), 403) in by
    assert ("127.0.0.1", f"/v1/blobs/{staged.digest}", 401) in by  # refused before the digest is parsed
    assert ("127.0.0.1", "/hf/acme/tiny/resolve/main/config.json", 401) in by
