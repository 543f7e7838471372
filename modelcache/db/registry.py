"""The registry's queries: every SQL statement modelcache runs outside migrations lives here.

Functions take an open connection (from :class:`~modelcache.db.pool.Database`)
so callers decide what shares a transaction. Parameters are always bound.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Iterable

from psycopg.types.json import Jsonb

from ..auth import Subject
from ..digest import Digest
from .pool import Connection


async def _one(conn: Connection, sql: str, params: Iterable[Any] = ()) -> dict | None:
    cur = await conn.execute(sql, tuple(params))
    return await cur.fetchone()


async def _all(conn: Connection, sql: str, params: Iterable[Any] = ()) -> list[dict]:
    cur = await conn.execute(sql, tuple(params))
    return await cur.fetchall()


# -- models and versions ------------------------------------------------------


async def upsert_model(conn: Connection, name: str, vendor: str | None, by: str) -> uuid.UUID:
    row = await _one(
        conn,
        """
        INSERT INTO models (name, vendor, updated_by) VALUES (%s, %s, %s)
        ON CONFLICT ON CONSTRAINT models_name_vendor_key DO UPDATE SET name = EXCLUDED.name
        RETURNING id
        """,
        (name, vendor, by),
    )
    return row["id"]


async def upsert_version(conn: Connection, model_id: uuid.UUID, version: str) -> uuid.UUID:
    row = await _one(
        conn,
        """
        INSERT INTO model_versions (model_id, version) VALUES (%s, %s)
        ON CONFLICT ON CONSTRAINT model_versions_model_id_version_key DO UPDATE SET version = EXCLUDED.version
        RETURNING id
        """,
        (model_id, version),
    )
    return row["id"]


async def merge_version_metadata(
    conn: Connection, version_id: uuid.UUID, capabilities: dict[str, Any], default_parameters: dict[str, Any] | None
) -> dict:
    """Add keys to a version's capabilities and default_parameters; a key already set keeps its value.

    What an operator (or an earlier sidecar) set is never overwritten by what a
    later import reads from a header. ``jsonb || jsonb`` keeps the right side's
    value for a key both have, so the stored document goes on the right.
    """
    defaults = Jsonb(default_parameters) if default_parameters is not None else None
    return await _one(
        conn,
        """
        UPDATE model_versions
           SET capabilities = %s::jsonb || capabilities,
               default_parameters = CASE WHEN %s::jsonb IS NULL THEN default_parameters
                                         ELSE %s::jsonb || coalesce(default_parameters, '{}'::jsonb) END,
               updated_at = now()
         WHERE id = %s
        RETURNING capabilities, default_parameters
        """,
        (Jsonb(capabilities), defaults, defaults, version_id),
    )


async def describe_model(conn: Connection, model_id: uuid.UUID, description: str, by: str) -> None:
    """Set a model's description if it has none; an operator's text is never replaced by an import."""
    await conn.execute(
        """
        UPDATE models SET description = %s, updated_at = now(), updated_by = %s
         WHERE id = %s AND description IS NULL
        """,
        (description, by, model_id),
    )


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


async def artifact_by_sha256(conn: Connection, sha256: Digest) -> dict | None:
    return await _one(
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
    return await _one(
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


async def blob_index_rows(conn: Connection, digests: list[str] | None = None) -> list[dict]:
    """What the blob server keeps in memory: size, state, and whether a promoted artifact holds it."""
    where = "" if digests is None else "WHERE b.digest = ANY(%s)"
    return await _all(
        conn,
        f"""
        SELECT b.digest, b.size_bytes, b.state,
               coalesce(bool_or(a.state = 'promoted'), false) AS promoted
          FROM blobs b
          LEFT JOIN artifact_files f ON f.blob_digest = b.digest
          LEFT JOIN model_artifacts a ON a.id = f.artifact_id
          {where}
         GROUP BY b.digest
        """,
        () if digests is None else (digests,),
    )


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


# -- audit --------------------------------------------------------------------


async def audit(
    conn: Connection,
    subject: Subject,
    action: str,
    resource_type: str,
    resource: str | None,
    *,
    decision: str = "allow",
    outcome: str | None = "ok",
    reason: str | None = None,
    details: dict | None = None,
) -> None:
    await conn.execute(
        """
        INSERT INTO model_audit_log
            (subject_type, subject_id, action, resource_type, resource, decision, outcome, reason, details)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            subject.type,
            subject.id,
            action,
            resource_type,
            resource,
            decision,
            outcome,
            reason,
            Jsonb(details) if details is not None else None,
        ),
    )


# -- tokens -------------------------------------------------------------------


async def insert_token(
    conn: Connection,
    *,
    name: str,
    role: str,
    token_sha256: str,
    node_id: uuid.UUID | None,
    expires_at: dt.datetime | None,
    by: str,
) -> dict:
    return await _one(
        conn,
        """
        INSERT INTO api_tokens (name, role, token_sha256, node_id, expires_at, created_by)
        VALUES (%s, %s, %s, %s, %s, %s)
        RETURNING id, name, role, node_id, created_at, created_by, expires_at, revoked_at
        """,
        (name, role, token_sha256, node_id, expires_at, by),
    )


async def revoke_token(conn: Connection, name: str) -> dict | None:
    return await _one(
        conn,
        """
        UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s
        RETURNING id, name, role, revoked_at
        """,
        (name,),
    )


async def list_tokens(conn: Connection) -> list[dict]:
    return await _all(
        conn,
        """
        SELECT id, name, role, node_id, created_at, created_by, expires_at, revoked_at
          FROM api_tokens ORDER BY created_at, name
        """,
    )


async def live_tokens(conn: Connection) -> list[dict]:
    """Tokens the server may accept: not revoked (expiry is checked per request)."""
    return await _all(
        conn,
        "SELECT token_sha256, name, role, node_id, expires_at FROM api_tokens WHERE revoked_at IS NULL",
    )


# -- preferences --------------------------------------------------------------


async def system_preferences(conn: Connection) -> dict[str, dict]:
    rows = await _all(
        conn,
        """
        SELECT key, value, value_type, version, updated_at, updated_by
          FROM preference_entries WHERE scope_type = 'system' AND scope_id IS NULL
        """,
    )
    return {row["key"]: row for row in rows}
