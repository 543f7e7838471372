"""Helpers shared by the query modules: one row, all rows, keyset paging with opaque cursors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any, Iterable

from psycopg import sql

from ..errors import InvalidInput
from .pool import Connection


async def one(conn: Connection, query: str, params: Iterable[Any] = ()) -> dict | None:
    cur = await conn.execute(query, tuple(params))
    return await cur.fetchone()


async def all_rows(conn: Connection, query: str, params: Iterable[Any] = ()) -> list[dict]:
    cur = await conn.execute(query, tuple(params))
    return await cur.fetchall()


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


async def page(conn: Connection, select: str, where: list[sql.Composable], params: list[Any], alias: str,
         limit: int, cursor: str | None, newest_first: bool = False,
         at: str = "created_at") -> tuple[list[dict], str | None]:
    """One page of ``select`` in (``at``, id) order of the table aliased ``alias``, and the next cursor.

    ``at`` is a timestamp column of ``alias`` that never changes once the row exists (else a row moved
    mid-walk would be seen twice or not at all); ``id``, the primary key, breaks ties.
    """
    table, column = sql.Identifier(alias), sql.Identifier(at)
    if cursor:
        stamp, row_id = decode_cursor(cursor)
        after = "({t}.{c}, {t}.id) < (%s, %s)" if newest_first else "({t}.{c}, {t}.id) > (%s, %s)"
        where.append(sql.SQL(after).format(t=table, c=column))
        params += [stamp, row_id]
    order = (" ORDER BY {t}.{c} DESC, {t}.id DESC LIMIT %s" if newest_first
             else " ORDER BY {t}.{c}, {t}.id LIMIT %s")
    query = sql.SQL(select) + (sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
    query += sql.SQL(order).format(t=table, c=column)
    cur = await conn.execute(query, [*params, limit + 1])
    rows = await cur.fetchall()
    next_cursor = encode_cursor(rows[limit - 1][at], rows[limit - 1]["id"]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def equal(conditions: dict[str, Any]) -> tuple[list[sql.Composable], list[Any]]:
    """``column = value`` for every condition whose value is not None."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in conditions.items():
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(*column.split("."))))
            params.append(value)
    return where, params

