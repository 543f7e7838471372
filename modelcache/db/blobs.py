"""The store's index: blob rows, their states, last access, and what the in-memory catalog loads."""

from __future__ import annotations

import datetime as dt
import struct

from ..digest import Digest
from .pool import Connection


async def record_blob(conn: Connection, digest: Digest, size: int, xxh3: str) -> None:
    """Index a committed blob; a blob seen before, evicted or quarantined, is present again: the
    store committed bytes that hashed to its digest (a quarantined blob's file had left ``blobs/``)."""
    await conn.execute(
        """
        INSERT INTO blobs (digest, size_bytes, xxh3_128) VALUES (%s, %s, %s)
        ON CONFLICT (digest) DO UPDATE SET state = 'present', verified_at = now()
            WHERE blobs.state IN ('evicted', 'quarantined')
        """,
        (str(digest), size, xxh3),
    )


# -- the blob server's catalog -------------------------------------------------
#
# The catalog keeps a million blobs in memory, so an entry is one int, packed here and unpacked by
# server/catalog.py: ``size << 3 | STATES.index(state) << 1 | promoted``, keyed by the digest's 32
# raw bytes. PostgreSQL packs the whole index itself, grouped by the digest's first byte (256 rows of
# fixed-size records), so loading a million blobs builds no per-row Python objects but the entries.

STATES = ("present", "quarantined", "evicted")  # blobs.state, in packing order
_RECORD = struct.Struct(">32sq")  # digest bytes, packed entry (int8send is big-endian)

_PROMOTED = """
    SELECT DISTINCT f.blob_digest FROM artifact_files f JOIN model_artifacts a ON a.id = f.artifact_id
     WHERE a.state = 'promoted'
"""
_PACKED = """b.size_bytes * 8 + CASE b.state WHEN 'present' THEN 0 WHEN 'quarantined' THEN 2 ELSE 4 END
               + (p.blob_digest IS NOT NULL)::int"""
_INDEX = f"""
    SELECT string_agg(decode(substr(b.digest, 8), 'hex') || int8send({_PACKED}), ''::bytea) AS records
      FROM blobs b LEFT JOIN ({_PROMOTED}) p ON p.blob_digest = b.digest
     GROUP BY substr(b.digest, 8, 2)
"""
_ENTRIES = f"""
    SELECT b.digest, {_PACKED} AS packed
      FROM blobs b LEFT JOIN ({_PROMOTED}) p ON p.blob_digest = b.digest
     WHERE b.digest = ANY(%s)
"""


async def blob_index(conn: Connection) -> tuple[dict[bytes, int], str]:
    """Every blob's packed entry, and the change mark to ask :func:`changes_since` with next.

    The mark is taken before the rows are read, so a change that commits in between is both in
    the rows and in the next answer of ``changes_since``: seen twice, never missed.
    """
    mark = await change_mark(conn)
    index: dict[bytes, int] = {}
    async with conn.cursor(binary=True) as cur:
        async for row in cur.stream(_INDEX, size=16):
            index.update(_RECORD.iter_unpack(row["records"]))
    return index, mark


async def blob_entries(conn: Connection, digests: list[str]) -> dict[str, int]:
    """The packed entries of these blobs (``sha256:...``); a digest without a row is left out."""
    cur = await conn.execute(_ENTRIES, (digests,))
    return {r["digest"]: r["packed"] for r in await cur.fetchall()}


async def change_mark(conn: Connection) -> str:
    """The oldest transaction still running: every change not yet visible now is logged at or above it."""
    cur = await conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS mark")
    return (await cur.fetchone())["mark"]


async def changes_since(conn: Connection, mark: str) -> tuple[list[str], str] | None:
    """The digests changed since ``mark`` (from :func:`change_mark`), and the mark to ask with next.

    None when the mark is not one of this database's past (a database restored or replaced while we
    were away): only a full reload is right then.
    """
    cur = await conn.execute(
        """
        SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS mark,
               %s::xid8 <= pg_snapshot_xmax(pg_current_snapshot()) AS known,
               array(SELECT DISTINCT digest FROM blob_changes WHERE xid >= %s::xid8) AS digests
        """,
        (mark, mark),
    )
    row = await cur.fetchone()
    return (row["digests"], row["mark"]) if row["known"] else None


async def prune_changes(conn: Connection, keep_seconds: float) -> int:
    """Forget logged changes older than ``keep_seconds``; a catalog away longer reloads whole."""
    cur = await conn.execute("DELETE FROM blob_changes WHERE changed_at < now() - make_interval(secs => %s)",
                             (keep_seconds,))
    return cur.rowcount


async def touch_blobs(conn: Connection, accessed: dict[str, dt.datetime]) -> None:
    """Record last access for many blobs (and their artifacts) in one round trip."""
    if not accessed:
        return
    digests = list(accessed)
    times = [accessed[d] for d in digests]
    await conn.execute(
        """
        WITH t AS (SELECT * FROM unnest(%s::text[], %s::timestamptz[]) AS t(digest, at)),
        b AS (UPDATE blobs SET last_accessed_at = greatest(blobs.last_accessed_at, t.at)
                FROM t WHERE blobs.digest = t.digest)
        UPDATE model_artifacts a SET last_accessed_at = greatest(a.last_accessed_at, t.at)
          FROM artifact_files f JOIN t ON t.digest = f.blob_digest
         WHERE f.artifact_id = a.id
        """,
        (digests, times),
    )


async def set_blob_state(conn: Connection, digest: str, state: str) -> None:
    await conn.execute("UPDATE blobs SET state = %s WHERE digest = %s", (state, digest))


async def mark_verified(conn: Connection, digest: str) -> None:
    await conn.execute("UPDATE blobs SET verified_at = now() WHERE digest = %s", (digest,))


async def blob_row(conn: Connection, digest: str) -> dict | None:
    cur = await conn.execute("SELECT * FROM blobs WHERE digest = %s", (digest,))
    return await cur.fetchone()


async def present_blobs(conn: Connection) -> list[dict]:
    cur = await conn.execute("SELECT digest, size_bytes FROM blobs WHERE state = 'present' ORDER BY digest")
    return await cur.fetchall()


async def cache_usage(conn: Connection) -> int:
    cur = await conn.execute("SELECT coalesce(sum(size_bytes), 0)::bigint AS used FROM blobs WHERE state = 'present'")
    return (await cur.fetchone())["used"]


async def blob_states(conn: Connection, digests: list[str]) -> dict[str, str]:
    cur = await conn.execute("SELECT digest, state FROM blobs WHERE digest = ANY(%s)", (digests,))
    return {r["digest"]: r["state"] for r in await cur.fetchall()}


async def lock_blob_state(conn: Connection, digest: str) -> str | None:
    """The blob's state, its row locked until the transaction ends (an import waits for it)."""
    cur = await conn.execute("SELECT state FROM blobs WHERE digest = %s FOR UPDATE", (digest,))
    row = await cur.fetchone()
    return row["state"] if row else None

