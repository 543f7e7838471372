"""API tokens: only the sha256 of a secret is ever stored."""

from __future__ import annotations

import datetime as dt
import uuid

from .pool import Connection
from .rows import all_rows, one


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
    return await one(
        conn,
        """
        INSERT INTO api_tokens (name, role, token_sha256, node_id, expires_at, created_by)
        VALUES (%s, %s, %s, %s, %s, %s)
        RETURNING id, name, role, node_id, created_at, created_by, expires_at, revoked_at
        """,
        (name, role, token_sha256, node_id, expires_at, by),
    )


async def revoke_token(conn: Connection, name: str) -> dict | None:
    return await one(
        conn,
        """
        UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s
        RETURNING id, name, role, revoked_at
        """,
        (name,),
    )


async def list_tokens(conn: Connection) -> list[dict]:
    return await all_rows(
        conn,
        """
        SELECT id, name, role, node_id, created_at, created_by, expires_at, revoked_at
          FROM api_tokens ORDER BY created_at, name
        """,
    )


async def live_tokens(conn: Connection) -> list[dict]:
    """Tokens the server may accept: not revoked (expiry is checked per request)."""
    return await all_rows(
        conn,
        "SELECT token_sha256, name, role, node_id, expires_at FROM api_tokens WHERE revoked_at IS NULL",
    )

