"""A frozen or dead database, seen from a real ``modelcache serve`` on its own embedded PostgreSQL.

Each test starts its own server and PostgreSQL under a temp data dir: the shared test
PostgreSQL other tests use is never frozen or killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import run_cli
from test_embedded import free_port

from modelcache.config import DatabaseSettings
from modelcache.db import Database
from modelcache.db.embedded import EmbeddedPostgres
from modelcache.errors import DatabaseUnavailable

# Small bounds so the test is quick; the slack covers a loaded machine, not a missing bound.
CONNECT, ACQUIRE, STATEMENT = 2, 2, 2
SLACK = 2.0


class Server:
    """``modelcache serve --data-dir DATA`` with its log in a file (a full stderr pipe would block it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        conf = tmp_path / "mc.toml"
        conf.write_text(f'[log]\nformat = "json"\n[database]\nconnect_timeout = {CONNECT}\n'
                        f'acquire_timeout = {ACQUIRE}\nstatement_timeout = {STATEMENT}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelcache", "serve", "--config", str(conf), "--data-dir", str(self.data),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=log, env=env)

    def get(self, path: str, token: str | None = None, timeout: float = 30) -> tuple[int, dict, bytes, float]:
        """(status, headers, body, seconds taken)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        started = time.monotonic()
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                                               headers=headers), timeout=timeout) as r:
                return r.status, dict(r.headers), r.read(), time.monotonic() - started
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read(), time.monotonic() - started

    def wait_for(self, path: str, status: int, token: str | None = None, within: float = 60) -> float:
        """Poll until ``path`` answers ``status``; returns the seconds it took."""
        started = time.monotonic()
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.get(path, token, timeout=5)[0] == status:
                    return time.monotonic() - started
            except OSError:
                pass
            assert time.monotonic() - started < within, f"{path} did not answer {status} within {within}s"
            time.sleep(0.2)

    def cli(self, *args: str) -> str:
        done = run_cli(*args, "--data-dir", str(self.data))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def postmaster(self) -> psutil.Process:
        return psutil.Process(int((self.data / "pg" / "postmaster.pid").read_text().split()[0]))

    def log_messages(self) -> list[str]:
        return [json.loads(line)["message"] for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(tmp_path):
    server = Server(tmp_path)
    try:
        server.wait_for("/readyz", 200)
        yield server
    finally:
        server.stop()


@pytest.fixture
def imported(serve, make_file):
    """A blob imported before the outage, and a reader and an admin token."""
    src = make_file(gguf=True, size=4096)
    digest = serve.cli("import", str(src), "--model", "m", "--version", "1")
    admin = serve.cli("token", "create", "--role", "admin", "--name", "admin")
    reader = serve.cli("token", "create", "--role", "reader", "--name", "reader")
    serve.wait_for(f"/v1/blobs/{digest}", 200, reader, within=10)
    return src.read_bytes(), digest, admin, reader


def test_frozen_postgresql_answers_503_naming_the_database_within_the_timeouts(serve, imported):
    content, digest, admin, reader = imported
    assert serve.get("/v1/models", admin)[0] == 200
    postmaster = serve.postmaster()
    frozen = [postmaster, *postmaster.children(recursive=True)]
    bound = max(ACQUIRE, STATEMENT + 1) + SLACK
    for proc in frozen:  # the postmaster first, so it starts no child we would miss
        proc.send_signal(signal.SIGSTOP)
    try:
        status, headers, body, took = serve.get("/v1/models", admin, timeout=bound + 5)
        print(f"frozen: /v1/models 503 after {took:.2f}s: {body!r}")
        assert status == 503, body
        assert headers["Content-Type"].startswith("application/problem+json")
        detail = json.loads(body)["detail"]
        assert detail.startswith("PostgreSQL modelcache on "), detail
        assert "acquire_timeout" in detail or "statement_timeout" in detail, detail
        assert took < bound, f"503 after {took:.1f}s"

        # many callers at once: each is answered within the bound, none waits on another's timeout
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: serve.get("/v1/models", admin, timeout=bound + 5), range(12)))
        print("frozen: 12 concurrent /v1/models answered after", sorted(round(a[3], 2) for a in answers))
        assert {a[0] for a in answers} == {503}
        assert max(a[3] for a in answers) < bound, [round(a[3], 1) for a in answers]

        status, _, body, took = serve.get("/readyz", timeout=bound + 5)
        print(f"frozen: /readyz {status} after {took:.2f}s")
        assert status == 503 and b"database" in body and took < bound, (status, body, took)

        # blobs are served from memory meanwhile
        status, _, body, _ = serve.get(f"/v1/blobs/{digest}", reader, timeout=5)
        assert status == 200 and body == content

        # frozen is not dead: the supervisor leaves a stopped postmaster alone
        assert postmaster.is_running() and postmaster.status() == psutil.STATUS_STOPPED
    finally:
        for proc in frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    took = serve.wait_for("/readyz", 200, within=30)
    serve.wait_for("/v1/models", 200, admin, within=30)
    print(f"recovered {took:.1f}s after SIGCONT")
    assert serve.postmaster().pid == postmaster.pid
    assert not any("restarting it" in m for m in serve.log_messages())


def test_killed_embedded_postgresql_is_restarted_and_the_catalog_reloads(serve, imported, make_file):
    content, digest, admin, reader = imported
    postmaster = serve.postmaster()
    killed_at = time.monotonic()
    postmaster.kill()  # not waited for: until init reaps it, it is a zombie that looks alive

    def restarted() -> bool:
        try:
            return serve.postmaster().pid != postmaster.pid
        except (FileNotFoundError, ValueError, IndexError, psutil.NoSuchProcess):
            return False  # between the old postmaster.pid and the new one

    # backends outlive their postmaster for a moment: a /readyz answered right now proves nothing
    while not restarted():
        assert serve.proc.poll() is None, serve.log.read_text()
        assert time.monotonic() - killed_at < 30, "the embedded PostgreSQL was not restarted within 30s"
        time.sleep(0.2)
    serve.wait_for("/readyz", 200, within=30 - (time.monotonic() - killed_at))
    print(f"ready again {time.monotonic() - killed_at:.1f}s after kill -9")
    serve.wait_for("/v1/models", 200, admin, within=10)
    status, _, body, _ = serve.get(f"/v1/blobs/{digest}", reader)
    assert status == 200 and body == content

    # the catalog follows the restarted database: a blob imported now (by another process) is served
    src = make_file(gguf=True, size=4096)
    fresh = serve.cli("import", str(src), "--model", "m", "--version", "2")
    serve.wait_for(f"/v1/blobs/{fresh}", 200, reader, within=10)

    restarts = [m for m in serve.log_messages() if "restarting it" in m]
    assert restarts and str(serve.data / "pg") in restarts[0] and f"pid {postmaster.pid}" in restarts[0], \
        serve.log_messages()


def _signal_all(postmaster: psutil.Process, sig: int, processes: list[psutil.Process] | None = None) -> list:
    processes = processes or [postmaster, *postmaster.children(recursive=True)]
    for proc in processes:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return processes


async def test_statement_bounds_cut_a_silent_server_and_spare_long_work(tmp_path):
    """The client-side bound (a connection taken before the freeze), PostgreSQL's own statement_timeout, and
    a dedicated connection (migrations, LISTEN) that neither bound cuts."""
    embedded = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(embedded.start)
    db = Database(dsn, DatabaseSettings(pool_min_size=1, pool_max_size=1, connect_timeout=2, acquire_timeout=2,
                                        statement_timeout=1))

    async def backend_pid(conn) -> int:
        return (await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]

    try:
        await db.open()
        async with db.connection() as conn:
            first = await backend_pid(conn)

        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        frozen: list = []
        try:
            with pytest.raises(DatabaseUnavailable) as err:
                async with db.connection() as conn:
                    frozen = _signal_all(postmaster, signal.SIGSTOP)
                    started = time.monotonic()
                    await conn.execute("SELECT 1")
            took = time.monotonic() - started
        finally:
            _signal_all(postmaster, signal.SIGCONT, frozen)
        assert err.value.detail.startswith(f"PostgreSQL modelcache on {tmp_path / 'pg'}"), err.value.detail
        assert "did not answer within 2s (database.statement_timeout)" in err.value.detail
        assert 2 <= took < 2 + SLACK, took
        async with db.connection() as conn:
            assert await backend_pid(conn) != first, "the connection that timed out went back to the pool"
            second = await backend_pid(conn)

        # a live server cancels a statement itself after statement_timeout; the connection stays usable
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as err:
            async with db.connection() as conn:
                await conn.execute("SELECT pg_sleep(5)")
        assert "cancelled a statement that ran longer than 1s" in err.value.detail
        assert time.monotonic() - started < 1 + SLACK
        async with db.connection() as conn:
            assert await backend_pid(conn) == second

        # long work on a dedicated connection is bounded by neither
        async with db.dedicated_connection() as conn:
            await conn.execute("SELECT pg_sleep(2.5)")
    finally:
        await db.close()
        await asyncio.to_thread(embedded.stop)


async def test_a_committed_change_is_not_undone_by_a_database_that_stops_answering(tmp_path, caplog):
    """An upload, promote, evict or token mint has committed when it refreshes this server's catalog: if
    PostgreSQL stops answering right then, the refresh gives up within the bounds and says so in the log,
    and the request's answer stands (a 503 there would lose a minted token's secret)."""
    from modelcache.db.migrate import migrate
    from modelcache.server.catalog import Catalog

    embedded = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(embedded.start)
    db = Database(dsn, DatabaseSettings(pool_min_size=1, pool_max_size=1, connect_timeout=2, acquire_timeout=2,
                                        statement_timeout=1))
    try:
        await db.open()
        await migrate(db)
        catalog = Catalog(db)
        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        frozen = _signal_all(postmaster, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await catalog.changed(["sha256:" + "ab" * 32])
            await catalog.tokens_changed()
            took = time.monotonic() - started
        finally:
            _signal_all(postmaster, signal.SIGCONT, frozen)
        assert took < 2 * (2 + SLACK), took
        assert any("changed blob(s) will be served as the change log tells" in m for m in caplog.messages)
        assert any("tokens will be read again when the database answers" in m for m in caplog.messages)
    finally:
        await db.close()
        await asyncio.to_thread(embedded.stop)
