"""Policy preferences (scope ``system``), versioned, with their own audit trail."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from .pool import Connection
from .rows import all_rows, page


async def system_preferences(conn: Connection) -> dict[str, dict]:
    rows = await all_rows(
        conn,
        """
        SELECT key, value, value_type, version, updated_at, updated_by
          FROM preference_entries WHERE scope_type = 'system' AND scope_id IS NULL
        """,
    )
    return {row["key"]: row for row in rows}


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



async def history(conn: Connection, *, limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of the system preferences' changes, newest first: key, old and new value, who, when,
    why; and the next cursor."""
    return await page(conn, """
        SELECT l.id, e.key, l.old_value, l.new_value, l.changed_at, l.changed_by, l.reason
          FROM preference_audit_log l JOIN preference_entries e ON e.id = l.entry_id""",
        [sql.SQL("e.scope_type = 'system' AND e.scope_id IS NULL")], [], "l", limit, cursor,
        newest_first=True, at="changed_at")
