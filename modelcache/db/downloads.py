"""Download jobs (``model_downloads``): requests, their state changes, progress, and claiming work.

A job is owned by one worker process at a time. Claiming picks candidates with
``FOR UPDATE SKIP LOCKED`` (so two processes never look at the same row at
once) and takes a session-level advisory lock on the job, held on the worker's
own long-lived connection for as long as it transfers: when the process dies,
PostgreSQL drops the connection and the lock with it, so the next worker takes
the ``running`` job over at once, without a lease to wait out. Row locks are
not kept past the claim, so progress updates and cancels never wait on them.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql

from .pool import Connection
from .rows import equal, one, page

CHANNEL = "modelcache_downloads"
_LOCK_CLASS = 0x646C  # "dl": advisory locks on download jobs, (class, hashtext(id))
_MISS_LOCK_CLASS = 0x7074  # "pt": transaction locks on a pull-through miss, (class, hashtext(source, reference))

ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "rejected", "cancelled")

_COLUMNS = {"source", "reference", "model_name", "model_vendor", "version", "requested_by", "state",
            "artifact_type", "expected_sha256", "approved_by", "bytes_done", "bytes_total", "error", "sha256",
            "artifact_id", "rate_bytes_per_second", "decided_by", "reason", "attempts"}


async def insert_download(conn: Connection, **fields: Any) -> dict:
    assert set(fields) <= _COLUMNS, set(fields) - _COLUMNS
    names = list(fields)
    query = sql.SQL("INSERT INTO model_downloads ({}) VALUES ({}) RETURNING *").format(
        sql.SQL(", ").join(map(sql.Identifier, names)), sql.SQL(", ").join(sql.Placeholder() * len(names)))
    return await one(conn, query, [fields[n] for n in names])


async def get_download(conn: Connection, download_id: uuid.UUID, for_update: bool = False) -> dict | None:
    query = "SELECT * FROM model_downloads WHERE id = %s" + (" FOR UPDATE" if for_update else "")
    return await one(conn, query, (download_id,))


async def list_downloads(conn: Connection, *, state: str | None, source: str | None, limit: int,
                         cursor: str | None) -> tuple[list[dict], str | None]:
    where, params = equal({"d.state": state, "d.source": source})
    return await page(conn, "SELECT d.* FROM model_downloads d", where, params, "d", limit, cursor,
                      newest_first=True)


async def update_download(conn: Connection, download_id: uuid.UUID, from_states: tuple[str, ...], *,
                          stamp: str | None = None, **fields: Any) -> dict | None:
    """Set ``fields`` if the job is in one of ``from_states``; None when it is not (someone got there first).

    ``stamp``: ``started`` sets started_at (the first time only), ``finished`` sets finished_at.
    """
    assert set(fields) <= _COLUMNS, set(fields) - _COLUMNS
    sets = [sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields]
    if stamp == "started":
        sets.append(sql.SQL("started_at = coalesce(started_at, now())"))
    elif stamp == "finished":
        sets.append(sql.SQL("finished_at = now()"))
    query = sql.SQL("UPDATE model_downloads SET {}, updated_at = now() WHERE id = %s AND state = ANY(%s) "
                    "RETURNING *").format(sql.SQL(", ").join(sets))
    return await one(conn, query, [*fields.values(), download_id, list(from_states)])


async def record_progress(conn: Connection, download_id: uuid.UUID, bytes_done: int, bytes_total: int | None,
                          rate: int | None, error: str | None = None) -> bool:
    """Progress of a running job; False when it is no longer running (cancelled meanwhile).

    ``error``: why the upstream is being asked again, while it is (cleared once it answers).
    """
    row = await one(conn, """
        UPDATE model_downloads SET bytes_done = %s, bytes_total = %s, rate_bytes_per_second = %s, error = %s,
               updated_at = now()
         WHERE id = %s AND state = 'running' RETURNING id""", (bytes_done, bytes_total, rate, error, download_id))
    return row is not None


# the same content: the same source and reference, or the same expected sha256
_TWIN = """(d.source = %(source)s AND d.reference = %(reference)s)
           OR (d.expected_sha256 IS NOT NULL AND d.expected_sha256 = %(expected)s)"""


async def earlier_twin(conn: Connection, row: dict) -> dict | None:
    """An active job (queued or running) for the same content, requested before ``row``: it goes first."""
    cur = await conn.execute("""
        SELECT d.id, d.state FROM model_downloads d
         WHERE d.state IN ('queued', 'running') AND (d.created_at, d.id) < (%(created_at)s, %(id)s)
           AND (""" + _TWIN + """)
         ORDER BY d.created_at, d.id LIMIT 1""", _twin_params(row))
    return await cur.fetchone()


async def shared_twin(conn: Connection, row: dict) -> dict | None:
    """A job for the same content that completed after ``row`` was requested: its result is ``row``'s too."""
    cur = await conn.execute("""
        SELECT d.* FROM model_downloads d
         WHERE d.state = 'completed' AND d.id <> %(id)s AND d.finished_at >= %(created_at)s AND (""" + _TWIN + """)
           AND (%(expected)s::text IS NULL OR d.sha256 = %(expected)s)
         ORDER BY d.finished_at DESC LIMIT 1""", _twin_params(row))
    return await cur.fetchone()


async def lock_miss(conn: Connection, source: str, reference: str) -> None:
    """Serialise pull-through requests for one source and reference until the transaction ends, across
    processes, so concurrent misses find the one request the first of them made."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_MISS_LOCK_CLASS, f"{source} {reference}"))


async def miss_twin(conn: Connection, source: str, reference: str, ended_within: float) -> dict | None:
    """The download a pull-through miss maps to: the newest open one (pending approval, queued or running)
    for this source and reference, else one that ended ``ended_within`` seconds ago or less: a failed,
    rejected or cancelled one (so a client retrying against a failing upstream is told at once, not queued
    again), or a completed one (a miss in the instant before the server's index holds what it brought
    waits for the index instead of asking for the same content again)."""
    return await one(conn, """
        SELECT * FROM model_downloads
         WHERE source = %s AND reference = %s
           AND (state IN ('pending_approval', 'queued', 'running')
                OR (state IN ('completed', 'failed', 'rejected', 'cancelled')
                    AND finished_at > now() - make_interval(secs => %s)))
         ORDER BY (state IN ('pending_approval', 'queued', 'running')) DESC, created_at DESC LIMIT 1""",
                     (source, reference, ended_within))


def _twin_params(row: dict) -> dict:
    return {"id": row["id"], "created_at": row["created_at"], "source": row["source"],
            "reference": row["reference"], "expected": row["expected_sha256"]}


async def notify(conn: Connection, download_id: uuid.UUID) -> None:
    """Wake the workers: a job became claimable (or was cancelled)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(download_id)))


async def claim_candidates(conn: Connection, limit: int = 16) -> list[dict]:
    """Jobs a worker may take (inside a transaction): queued ones, and running ones whose owner is gone.

    Rows another claimer is looking at are skipped; the caller keeps only a job whose advisory
    lock it gets (:func:`try_own`).
    """
    cur = await conn.execute("""
        SELECT * FROM model_downloads WHERE state IN ('queued', 'running')
         ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED""", (limit,))
    return await cur.fetchall()


async def try_own(lock_conn: Any, download_id: uuid.UUID) -> bool:
    """Take the job's advisory lock on the worker's own connection; False when another process holds it."""
    cur = await lock_conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s)) AS got",
                                  (_LOCK_CLASS, str(download_id)))
    return (await cur.fetchone())["got"]


async def disown(lock_conn: Any, download_id: uuid.UUID) -> None:
    await lock_conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, str(download_id)))


async def counts_by_state(conn: Connection) -> dict[str, int]:
    cur = await conn.execute("SELECT state, count(*) AS n FROM model_downloads GROUP BY state")
    return {r["state"]: r["n"] for r in await cur.fetchall()}
