"""Artifacts and their files: registration, listing, state changes, and what eviction decides on."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql

from ..digest import Digest
from .pool import Connection
from .rows import equal, one, page


async def artifact_by_sha256(conn: Connection, sha256: Digest) -> dict | None:
    return await one(
        conn,
        """
        SELECT a.*, v.version, m.name AS model_name, m.vendor AS model_vendor
          FROM model_artifacts a
          JOIN model_versions v ON v.id = a.model_version_id
          JOIN models m ON m.id = v.model_id
         WHERE a.sha256 = %s
        """,
        (sha256.hex,),
    )


async def insert_artifact(
    conn: Connection,
    *,
    version_id: uuid.UUID,
    artifact_type: str,
    sha256: Digest,
    size: int,
    cache_path: str,
    source_uri: str | None,
    state: str,
    by: str,
) -> dict:
    return await one(
        conn,
        """
        INSERT INTO model_artifacts
            (model_version_id, artifact_type, sha256, size_bytes, cache_path, source_uri, state, updated_by)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        RETURNING *
        """,
        (version_id, artifact_type, sha256.hex, size, cache_path, source_uri, state, by),
    )


async def insert_artifact_file(
    conn: Connection, artifact_id: uuid.UUID, path: str, digest: Digest, size: int, media_type: str
) -> None:
    await conn.execute(
        """
        INSERT INTO artifact_files (artifact_id, path, blob_digest, size_bytes, media_type)
        VALUES (%s, %s, %s, %s, %s)
        """,
        (artifact_id, path, str(digest), size, media_type),
    )


_ARTIFACT_SELECT = """
    SELECT a.id, a.model_version_id, a.artifact_type, a.sha256, a.size_bytes, a.cache_path, a.source_uri,
           a.state, a.pinned, a.last_accessed_at, a.created_at, a.updated_at, a.updated_by,
           v.version, m.id AS model_id, m.name AS model_name, m.vendor AS model_vendor
      FROM model_artifacts a
      JOIN model_versions v ON v.id = a.model_version_id
      JOIN models m ON m.id = v.model_id
"""


async def list_artifacts(conn: Connection, *, filters: dict[str, Any], limit: int,
                         cursor: str | None) -> tuple[list[dict], str | None]:
    columns = {"model": "m.name", "vendor": "m.vendor", "version": "v.version", "model_version_id": "v.id",
               "artifact_type": "a.artifact_type", "state": "a.state", "sha256": "a.sha256", "pinned": "a.pinned"}
    where, params = equal({columns[key]: value for key, value in filters.items()})
    return await page(conn, _ARTIFACT_SELECT, where, params, "a", limit, cursor)


async def get_artifact(conn: Connection, artifact_id: uuid.UUID | None = None, sha256: str | None = None,
                       for_update: bool = False) -> dict | None:
    query = sql.SQL(_ARTIFACT_SELECT + " WHERE {} = %s" + (" FOR UPDATE OF a" if for_update else "")).format(
        sql.Identifier("a", "id" if artifact_id is not None else "sha256"))
    cur = await conn.execute(query, (artifact_id if artifact_id is not None else sha256,))
    return await cur.fetchone()


async def artifact_files(conn: Connection, artifact_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[dict]]:
    cur = await conn.execute(
        """
        SELECT f.artifact_id, f.path, f.blob_digest, f.size_bytes, f.media_type, b.state AS blob_state,
               b.verified_at
          FROM artifact_files f JOIN blobs b ON b.digest = f.blob_digest
         WHERE f.artifact_id = ANY(%s) ORDER BY f.path
        """,
        (artifact_ids,),
    )
    out: dict[uuid.UUID, list[dict]] = {i: [] for i in artifact_ids}
    for row in await cur.fetchall():
        out[row["artifact_id"]].append(row)
    return out


async def set_artifact(conn: Connection, artifact_id: uuid.UUID, by: str, **changes: Any) -> None:
    assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in changes)
    await conn.execute(
        sql.SQL("UPDATE model_artifacts SET {}, updated_at = now(), updated_by = %s WHERE id = %s").format(
            assignments),
        [*changes.values(), by, artifact_id],
    )


async def artifact_in_use(conn: Connection, artifact_id: uuid.UUID) -> list[str]:
    """Nodes loading this artifact's model version right now."""
    cur = await conn.execute(
        """
        SELECT node_id::text FROM node_model_availability n JOIN model_artifacts a
            ON a.model_version_id = n.model_version_id WHERE a.id = %s AND n.status = 'loading'
        UNION
        SELECT node_id::text FROM node_load_requests r JOIN model_artifacts a
            ON a.model_version_id = r.model_version_id WHERE a.id = %s AND r.state IN ('pending', 'loading')
        """,
        (artifact_id, artifact_id),
    )
    return [r["node_id"] for r in await cur.fetchall()]


async def unshared_blobs(conn: Connection, artifact_id: uuid.UUID) -> list[dict]:
    """Blobs of this artifact that no other live (not evicted) artifact holds."""
    cur = await conn.execute(
        """
        SELECT b.digest, b.size_bytes FROM artifact_files f JOIN blobs b ON b.digest = f.blob_digest
         WHERE f.artifact_id = %s AND b.state = 'present'
           AND NOT EXISTS (SELECT 1 FROM artifact_files g JOIN model_artifacts o ON o.id = g.artifact_id
                            WHERE g.blob_digest = f.blob_digest AND o.id <> %s AND o.state <> 'evicted')
        """,
        (artifact_id, artifact_id),
    )
    return await cur.fetchall()


async def restore_quarantined(conn: Connection, digests: list[str], state: str, by: str) -> list[dict]:
    """Quarantined artifacts holding any of ``digests`` whose every blob is present again now go to ``state``."""
    cur = await conn.execute(
        """
        UPDATE model_artifacts a SET state = %s, updated_at = now(), updated_by = %s
         WHERE a.state = 'quarantined'
           AND EXISTS (SELECT 1 FROM artifact_files f WHERE f.artifact_id = a.id AND f.blob_digest = ANY(%s))
           AND NOT EXISTS (SELECT 1 FROM artifact_files f JOIN blobs b ON b.digest = f.blob_digest
                            WHERE f.artifact_id = a.id AND b.state <> 'present')
        RETURNING a.id, a.sha256
        """,
        (state, by, digests),
    )
    return await cur.fetchall()


async def artifacts_of_blob(conn: Connection, digest: str) -> list[dict]:
    cur = await conn.execute(
        "SELECT a.id, a.sha256, a.state FROM model_artifacts a JOIN artifact_files f ON f.artifact_id = a.id "
        "WHERE f.blob_digest = %s", (digest,))
    return await cur.fetchall()


async def eviction_candidates(conn: Connection, policy: str) -> list[dict]:
    """Live artifacts that may be evicted, in the order the policy evicts them."""
    cur = await conn.execute(_EVICTION_ORDER[policy])
    return await cur.fetchall()


_EVICTABLE = """
    SELECT a.id, a.sha256, a.size_bytes, a.state FROM model_artifacts a
     WHERE a.state IN ('promoted', 'staged') AND NOT a.pinned
"""
_EVICTION_ORDER = {
    "lru": _EVICTABLE + " ORDER BY coalesce(a.last_accessed_at, a.created_at), a.created_at",
    "largest_first": _EVICTABLE + " ORDER BY a.size_bytes DESC, a.created_at",
}


async def counts_by_state(conn: Connection) -> dict[str, int]:
    cur = await conn.execute("SELECT state, count(*) AS n FROM model_artifacts GROUP BY state")
    return {r["state"]: r["n"] for r in await cur.fetchall()}

