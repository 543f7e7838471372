"""API tokens: only the sha256 of a secret is ever stored."""

from __future__ import annotations

import datetime as dt
import uuid

from .pool import Connection
from .rows import all_rows, one, page

_COLUMNS = "id, name, role, node_id, created_at, created_by, expires_at, revoked_at"


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
        RETURNING id, name, role, node_id, created_at, created_by, expires_at, revoked_at
        """,
        (name,),
    )


async def list_tokens(conn: Connection, *, limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of tokens, revoked ones included, oldest first; and the next cursor."""
    return await page(conn, "SELECT " + _COLUMNS + " FROM api_tokens t", [], [], "t", limit, cursor)


async def all_tokens(conn: Connection) -> list[dict]:
    """Every token, revoked ones included, oldest first (the bootstrap CLI on the cache host)."""
    return await all_rows(conn, "SELECT " + _COLUMNS + " FROM api_tokens ORDER BY created_at, id")


async def live_tokens(conn: Connection) -> list[dict]:
    """Tokens the server may accept: not revoked (expiry is checked per request)."""
    return await all_rows(
        conn,
        "SELECT token_sha256, name, role, node_id, expires_at FROM api_tokens WHERE revoked_at IS NULL",
    )

