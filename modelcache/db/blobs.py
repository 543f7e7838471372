"""The store's index: blob rows, their states, last access, and what the in-memory catalog loads."""

from __future__ import annotations

import datetime as dt

from ..digest import Digest
from .pool import Connection
from .rows import all_rows


async def record_blob(conn: Connection, digest: Digest, size: int, xxh3: str) -> None:
    """Index a committed blob; a blob seen before (even evicted) is present again."""
    await conn.execute(
        """
        INSERT INTO blobs (digest, size_bytes, xxh3_128) VALUES (%s, %s, %s)
        ON CONFLICT (digest) DO UPDATE SET state = 'present', verified_at = now()
            WHERE blobs.state = 'evicted'
        """,
        (str(digest), size, xxh3),
    )


async def blob_index_rows(conn: Connection, digests: list[str] | None = None) -> list[dict]:
    """What the blob server keeps in memory: size, state, and whether a promoted artifact holds it."""
    if digests is None:
        return await all_rows(conn, _BLOB_INDEX + " GROUP BY b.digest")
    return await all_rows(conn, _BLOB_INDEX + " WHERE b.digest = ANY(%s) GROUP BY b.digest", (digests,))


_BLOB_INDEX = """
    SELECT b.digest, b.size_bytes, b.state, coalesce(bool_or(a.state = 'promoted'), false) AS promoted
      FROM blobs b
      LEFT JOIN artifact_files f ON f.blob_digest = b.digest
      LEFT JOIN model_artifacts a ON a.id = f.artifact_id
"""


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

