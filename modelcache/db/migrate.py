"""Versioned schema: ``schema.sql`` installs a fresh database, ``migrations/NNNN_name.sql`` upgrade old ones.

A migration is never edited once released: a database already past it would
never see the edit. ``schema_migrations`` records the sha256 of each applied
file, and every start-up (``migrate`` and ``status``) refuses a database whose
record differs from the file shipped (:class:`MigrationChanged`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import MigrationChanged, SchemaTooNew
from .pool import Database

logger = logging.getLogger(__name__)

# Serialises concurrent start-ups (serve and syncd started together) on one database.
_LOCK_KEY = 0x6D6F64656C  # "model"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str  # sha256 of the file's bytes, hex

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("modelcache").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            data = entry.read_bytes()
            found.append(Migration(int(match.group(1)), match.group(2), data.decode("utf-8"),
                                   hashlib.sha256(data).hexdigest()))
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
    await _verify_checksums(conn, known)
    return SchemaStatus(current, latest, [m for m in known if m.version > current])


async def _verify_checksums(conn, known: list[Migration]) -> None:
    """Refuse a database whose applied migrations differ from the files shipped."""
    if not await _records_checksums(conn):
        return  # before 0002: nothing recorded yet; 0002 fills in 0001's released checksum
    shipped = {m.version: m for m in known}
    cur = await conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    for row in await cur.fetchall():
        m = shipped.get(row["version"])
        if m is None:
            raise MigrationChanged(f"{row['version']:04d}_{row['name']}", row["checksum"], None)
        if row["checksum"] != m.checksum:
            raise MigrationChanged(m.label, row["checksum"], m.checksum)


async def _records_checksums(conn) -> bool:
    # The column arrives with migration 0002; a database at version 1 lacks it.
    cur = await conn.execute(
        """SELECT EXISTS (SELECT FROM pg_attribute
                           WHERE attrelid = 'schema_migrations'::regclass
                             AND attname = 'checksum' AND NOT attisdropped) AS present""")
    return (await cur.fetchone())["present"]


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
    :class:`SchemaTooNew`. It runs on a connection of its own: waiting for
    another process's migration and a long migration must not be cut by the
    pool's statement timeout.
    """
    async with db.dedicated_connection() as conn:
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
                logger.info("applied migration %s (sha256 %s)", m.label, m.checksum)
            return state.pending
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def _stamp(conn, m: Migration) -> None:
    if await _records_checksums(conn):
        await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                           (m.version, m.name, m.checksum))
    else:  # 0001 on the migrations road: 0002 adds the column and fills this row
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
