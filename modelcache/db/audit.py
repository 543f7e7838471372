"""The audit log: writing events (allowed and denied) and reading them back, paged; event counts for /metrics."""

from __future__ import annotations

import datetime as dt

from psycopg import sql
from psycopg.types.json import Jsonb

from ..auth import Subject
from .pool import Connection
from .rows import equal, page


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


async def audit_page(conn: Connection, *, action: str | None, subject: str | None, resource: str | None,
                     decision: str | None, since: dt.datetime | None, until: dt.datetime | None, limit: int,
                     cursor: str | None) -> tuple[list[dict], str | None]:
    where, params = equal({"l.action": action, "l.resource": resource, "l.decision": decision})
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
    return await page(conn, "SELECT l.* FROM model_audit_log l", where, params, "l", limit, cursor,
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

