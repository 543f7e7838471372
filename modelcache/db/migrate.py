"""Versioned schema: ``schema.sql`` installs a fresh database, ``migrations/NNNN_name.sql`` upgrade old ones."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import SchemaTooNew
from .pool import Database

logger = logging.getLogger(__name__)

# Serialises concurrent start-ups (serve and syncd started together) on one database.
_LOCK_KEY = 0x6D6F64656C  # "model"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("modelcache").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def schema_sql() -> str:
    return resources.files("modelcache").joinpath("schema.sql").read_text()


@dataclass(frozen=True)
class SchemaStatus:
    current: int | None  # None: an empty database
    latest: int
    pending: list[Migration]

    @property
    def up_to_date(self) -> bool:
        return self.current == self.latest


async def status(db: Database) -> SchemaStatus:
    async with db.connection() as conn:
        return await _status(conn)


async def _status(conn) -> SchemaStatus:
    known = migrations()
    latest = known[-1].version
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
    if not (await cur.fetchone())["present"]:
        return SchemaStatus(None, latest, known)
    cur = await conn.execute("SELECT max(version) AS v FROM schema_migrations")
    current = (await cur.fetchone())["v"] or 0
    if current > latest:
        raise SchemaTooNew(
            f"database schema is at version {current}, this modelcache knows up to {latest}: "
            "upgrade modelcache before using this database"
        )
    return SchemaStatus(current, latest, [m for m in known if m.version > current])


_BOOKKEEPING = """
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def migrate(db: Database, *, fresh_from_schema: bool = True) -> list[Migration]:
    """Bring the database to the latest schema; returns what was applied.

    An empty database gets ``schema.sql`` and is stamped with every known
    version (or, with ``fresh_from_schema=False``, every migration in turn:
    the equivalence test uses that road). An older database gets each pending
    migration in its own transaction; a newer one is refused with
    :class:`SchemaTooNew`.
    """
    async with db.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            state = await _status(conn)
            if state.current is None and fresh_from_schema:
                async with conn.transaction():
                    await conn.execute(schema_sql())
                    for m in state.pending:
                        await _stamp(conn, m)
                logger.info("installed schema version %d into an empty database", state.latest)
                return state.pending
            if state.current is None:
                await conn.execute(_BOOKKEEPING)
            for m in state.pending:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await _stamp(conn, m)
                logger.info("applied migration %04d_%s", m.version, m.name)
            return state.pending
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def _stamp(conn, m: Migration) -> None:
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
