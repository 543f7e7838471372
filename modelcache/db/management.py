"""Queries of the management API: listing and filtering the registry, artifact actions,
preferences, audit reading, and the facts eviction and scrubbing decide on.

Lists use keyset paging: the cursor is the last row's sort key, opaque to clients.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from ..errors import InvalidInput
from .pool import Connection

_ARTIFACT_SELECT = """
    SELECT a.id, a.model_version_id, a.artifact_type, a.sha256, a.size_bytes, a.cache_path, a.source_uri,
           a.state, a.pinned, a.last_accessed_at, a.created_at, a.updated_at, a.updated_by,
           v.version, m.id AS model_id, m.name AS model_name, m.vendor AS model_vendor
      FROM model_artifacts a
      JOIN model_versions v ON v.id = a.model_version_id
      JOIN models m ON m.id = v.model_id
"""

_VERSION_SELECT = """
    SELECT v.id, v.model_id, v.version, v.capabilities, v.default_parameters, v.created_at, v.updated_at,
           m.name AS model_name, m.vendor AS model_vendor
      FROM model_versions v JOIN models m ON m.id = v.model_id
"""


# -- cursors ------------------------------------------------------------------


def encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, row_id = json.loads(raw)
        return dt.datetime.fromisoformat(at), uuid.UUID(row_id)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid cursor {cursor[:40]!r}: pass back a next_cursor from a previous page") from exc


async def _page(conn: Connection, select: str, where: list[sql.Composable], params: list[Any], alias: str,
                limit: int, cursor: str | None, newest_first: bool = False) -> tuple[list[dict], str | None]:
    if cursor:
        at, row_id = decode_cursor(cursor)
        op = "<" if newest_first else ">"
        where.append(sql.SQL(f"({alias}.created_at, {alias}.id) {op} (%s, %s)"))
        params += [at, row_id]
    order = "DESC" if newest_first else "ASC"
    query = sql.SQL(select) + (sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
    query += sql.SQL(f" ORDER BY {alias}.created_at {order}, {alias}.id {order} LIMIT %s")
    cur = await conn.execute(query, [*params, limit + 1])
    rows = await cur.fetchall()
    next_cursor = encode_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def _equal(conditions: dict[str, Any]) -> tuple[list[sql.Composable], list[Any]]:
    """``column = value`` for every condition whose value is not None."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in conditions.items():
        if value is not None:
            where.append(sql.SQL(f"{column} = %s"))
            params.append(value)
    return where, params


# -- models and versions ------------------------------------------------------


async def list_models(conn: Connection, *, name: str | None, vendor: str | None, limit: int,
                      cursor: str | None) -> tuple[list[dict], str | None]:
    where, params = _equal({"m.name": name, "m.vendor": vendor})
    return await _page(conn, "SELECT m.* FROM models m", where, params, "m", limit, cursor)


async def get_model(conn: Connection, model_id: uuid.UUID) -> dict | None:
    cur = await conn.execute("SELECT * FROM models WHERE id = %s", (model_id,))
    return await cur.fetchone()


async def list_versions(conn: Connection, *, model_id: uuid.UUID | None, model: str | None, vendor: str | None,
                        version: str | None, requires: dict[str, Any], promoted_only: bool, limit: int,
                        cursor: str | None) -> tuple[list[dict], str | None]:
    """Versions matching capability requirements: the query model selection uses.

    ``requires`` holds ``context_length`` (at least), booleans such as
    ``tool_use`` that must be equal, and ``languages`` that must all be listed.
    """
    where, params = _equal({"v.model_id": model_id, "m.name": model, "m.vendor": vendor, "v.version": version})
    for key, value in requires.items():
        if key == "context_length":
            where.append(sql.SQL("jsonb_typeof(v.capabilities->'context_length') = 'number' "
                                 "AND (v.capabilities->>'context_length')::numeric >= %s"))
            params.append(value)
        elif key == "languages":
            where.append(sql.SQL("v.capabilities->'languages' @> %s"))
            params.append(Jsonb(value))
        elif key == "gpu_required" and value is False:
            where.append(sql.SQL("coalesce(v.capabilities->'gpu_required', 'false'::jsonb) = 'false'::jsonb"))
        else:
            where.append(sql.SQL("v.capabilities @> %s"))
            params.append(Jsonb({key: value}))
    if promoted_only:
        where.append(sql.SQL("EXISTS (SELECT 1 FROM model_artifacts a WHERE a.model_version_id = v.id "
                             "AND a.state = 'promoted')"))
    return await _page(conn, _VERSION_SELECT, where, params, "v", limit, cursor)


async def get_version(conn: Connection, version_id: uuid.UUID) -> dict | None:
    cur = await conn.execute(_VERSION_SELECT + " WHERE v.id = %s", (version_id,))
    return await cur.fetchone()


async def patch_version(conn: Connection, version_id: uuid.UUID, capabilities: dict | None,
                        default_parameters: dict | None, clear_default_parameters: bool) -> dict | None:
    """Merge keys into capabilities/default_parameters; a key set to null is removed."""
    cur = await conn.execute(
        """
        UPDATE model_versions SET
            capabilities = CASE WHEN %(caps)s::jsonb IS NULL THEN capabilities
                                ELSE jsonb_strip_nulls(capabilities || %(caps)s::jsonb) END,
            default_parameters = CASE WHEN %(clear)s THEN NULL
                                      WHEN %(params)s::jsonb IS NULL THEN default_parameters
                                      ELSE jsonb_strip_nulls(coalesce(default_parameters, '{}') || %(params)s::jsonb)
                                 END,
            updated_at = now()
        WHERE id = %(id)s
        RETURNING id
        """,
        {"caps": Jsonb(capabilities) if capabilities is not None else None,
         "params": Jsonb(default_parameters) if default_parameters is not None else None,
         "clear": clear_default_parameters, "id": version_id},
    )
    return await cur.fetchone()


# -- artifacts ----------------------------------------------------------------


async def list_artifacts(conn: Connection, *, filters: dict[str, Any], limit: int,
                         cursor: str | None) -> tuple[list[dict], str | None]:
    columns = {"model": "m.name", "vendor": "m.vendor", "version": "v.version", "model_version_id": "v.id",
               "artifact_type": "a.artifact_type", "state": "a.state", "sha256": "a.sha256", "pinned": "a.pinned"}
    where, params = _equal({columns[key]: value for key, value in filters.items()})
    return await _page(conn, _ARTIFACT_SELECT, where, params, "a", limit, cursor)


async def get_artifact(conn: Connection, artifact_id: uuid.UUID | None = None, sha256: str | None = None,
                       for_update: bool = False) -> dict | None:
    column, value = ("a.id", artifact_id) if artifact_id is not None else ("a.sha256", sha256)
    lock = " FOR UPDATE OF a" if for_update else ""
    cur = await conn.execute(f"{_ARTIFACT_SELECT} WHERE {column} = %s{lock}", (value,))
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


async def artifacts_of_blob(conn: Connection, digest: str) -> list[dict]:
    cur = await conn.execute(
        "SELECT a.id, a.sha256, a.state FROM model_artifacts a JOIN artifact_files f ON f.artifact_id = a.id "
        "WHERE f.blob_digest = %s", (digest,))
    return await cur.fetchall()


async def cache_usage(conn: Connection) -> int:
    cur = await conn.execute("SELECT coalesce(sum(size_bytes), 0)::bigint AS used FROM blobs WHERE state = 'present'")
    return (await cur.fetchone())["used"]


async def eviction_candidates(conn: Connection, policy: str) -> list[dict]:
    """Live artifacts that may be evicted, in the order the policy evicts them."""
    order = {"lru": "coalesce(a.last_accessed_at, a.created_at) ASC, a.created_at ASC",
             "largest_first": "a.size_bytes DESC, a.created_at ASC"}[policy]
    cur = await conn.execute(
        f"""
        SELECT a.id, a.sha256, a.size_bytes, a.state FROM model_artifacts a
         WHERE a.state IN ('promoted', 'staged') AND NOT a.pinned
         ORDER BY {order}
        """
    )
    return await cur.fetchall()


async def counts_by_state(conn: Connection) -> dict[str, int]:
    cur = await conn.execute("SELECT state, count(*) AS n FROM model_artifacts GROUP BY state")
    return {r["state"]: r["n"] for r in await cur.fetchall()}


# -- preferences --------------------------------------------------------------


async def get_preference(conn: Connection, key: str, for_update: bool = False) -> dict | None:
    if for_update:  # also serialises the first write of a key, when there is no row to lock yet
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('preference:' || %s))", (key,))
    cur = await conn.execute(
        "SELECT * FROM preference_entries WHERE scope_type = 'system' AND scope_id IS NULL AND key = %s", (key,))
    return await cur.fetchone()


async def upsert_preference(conn: Connection, key: str, value: Any, value_type: str, by: str,
                            old: dict | None) -> dict:
    if old is None:
        cur = await conn.execute(
            """
            INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by)
            VALUES ('system', %s, %s, %s, %s) RETURNING *
            """,
            (key, Jsonb(value), value_type, by))
    else:
        cur = await conn.execute(
            """
            UPDATE preference_entries SET value = %s, value_type = %s, version = version + 1, updated_at = now(),
                   updated_by = %s WHERE id = %s RETURNING *
            """,
            (Jsonb(value), value_type, by, old["id"]))
    return await cur.fetchone()


async def preference_audit(conn: Connection, entry_id: uuid.UUID, old_value: Any, new_value: Any, by: str,
                           reason: str | None) -> None:
    await conn.execute(
        "INSERT INTO preference_audit_log (entry_id, old_value, new_value, changed_by, reason) "
        "VALUES (%s, %s, %s, %s, %s)",
        (entry_id, Jsonb(old_value), Jsonb(new_value), by, reason))


# -- audit --------------------------------------------------------------------


async def audit_page(conn: Connection, *, action: str | None, subject: str | None, resource: str | None,
                     decision: str | None, since: dt.datetime | None, until: dt.datetime | None, limit: int,
                     cursor: str | None) -> tuple[list[dict], str | None]:
    where, params = _equal({"l.action": action, "l.resource": resource, "l.decision": decision})
    if subject is not None:  # "token:admin" or just "admin"
        kind, _, ident = subject.rpartition(":")
        if kind:
            where.append(sql.SQL("l.subject_type = %s AND l.subject_id = %s"))
            params += [kind, ident]
        else:
            where.append(sql.SQL("l.subject_id = %s"))
            params.append(ident)
    if since is not None:
        where.append(sql.SQL("l.created_at >= %s"))
        params.append(since)
    if until is not None:
        where.append(sql.SQL("l.created_at < %s"))
        params.append(until)
    return await _page(conn, "SELECT l.* FROM model_audit_log l", where, params, "l", limit, cursor,
                       newest_first=True)


async def event_counts(conn: Connection) -> dict[tuple[str, str | None], int]:
    cur = await conn.execute(
        """
        SELECT action, outcome, count(*) AS n FROM model_audit_log
         WHERE action IN ('model_artifact.import', 'model_artifact.evict', 'blob.quarantine',
                          'model_download.complete', 'model_download.fail')
         GROUP BY action, outcome
        """)
    return {(r["action"], r["outcome"]): r["n"] for r in await cur.fetchall()}


async def download_bytes(conn: Connection) -> int:
    cur = await conn.execute("SELECT coalesce(sum(bytes_done), 0)::bigint AS n FROM model_downloads")
    return (await cur.fetchone())["n"]


async def blob_states(conn: Connection, digests: list[str]) -> dict[str, str]:
    cur = await conn.execute("SELECT digest, state FROM blobs WHERE digest = ANY(%s)", (digests,))
    return {r["digest"]: r["state"] for r in await cur.fetchall()}


async def lock_blob_state(conn: Connection, digest: str) -> str | None:
    """The blob's state, its row locked until the transaction ends (an import waits for it)."""
    cur = await conn.execute("SELECT state FROM blobs WHERE digest = %s FOR UPDATE", (digest,))
    row = await cur.fetchone()
    return row["state"] if row else None
