"""Models and their versions: upserts on import, listing with the capability query, metadata edits."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from .pool import Connection
from .rows import equal, one, page


async def upsert_model(conn: Connection, name: str, vendor: str | None, by: str) -> uuid.UUID:
    row = await one(
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
    row = await one(
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
    return await one(
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


_VERSION_SELECT = """
    SELECT v.id, v.model_id, v.version, v.capabilities, v.default_parameters, v.created_at, v.updated_at,
           m.name AS model_name, m.vendor AS model_vendor
      FROM model_versions v JOIN models m ON m.id = v.model_id
"""


async def list_models(conn: Connection, *, name: str | None, vendor: str | None, limit: int,
                      cursor: str | None) -> tuple[list[dict], str | None]:
    where, params = equal({"m.name": name, "m.vendor": vendor})
    return await page(conn, "SELECT m.* FROM models m", where, params, "m", limit, cursor)


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
    where, params = equal({"v.model_id": model_id, "m.name": model, "m.vendor": vendor, "v.version": version})
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
    return await page(conn, _VERSION_SELECT, where, params, "v", limit, cursor)


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

