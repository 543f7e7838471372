"""Nodes, what they hold (``node_model_availability``), their load requests and placements."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from .pool import Connection
from .rows import all_rows, equal, one, page

LOADS_CHANNEL = "modelcache_loads"  # payload: a node id (trigger on node_load_requests)
OPEN_LOADS = ("pending", "loading")

# -- nodes ------------------------------------------------------------------------

_NODE_SELECT = """
    SELECT n.*, (SELECT count(*) FROM node_model_availability a
                  WHERE a.node_id = n.id AND a.status = 'available') AS available_models
      FROM nodes n
"""


async def upsert_node(conn: Connection, node_id: uuid.UUID, name: str, labels: dict, facts: dict,
                      by: str) -> tuple[dict, dict | None]:
    """Insert or update a node (and count the registration as contact); returns (row, the row before)."""
    before = await one(conn, "SELECT * FROM nodes WHERE id = %s FOR UPDATE", (node_id,))
    row = await one(conn, """
        INSERT INTO nodes (id, name, labels, facts, last_seen_at, updated_by) VALUES (%s, %s, %s, %s, now(), %s)
        ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, labels = EXCLUDED.labels, facts = EXCLUDED.facts,
               last_seen_at = now(), updated_at = now(), updated_by = EXCLUDED.updated_by
        RETURNING *""", (node_id, name, Jsonb(labels), Jsonb(facts), by))
    return row, before


async def set_token_name(conn: Connection, node_id: uuid.UUID, token_name: str) -> None:
    await conn.execute("UPDATE nodes SET token_name = %s WHERE id = %s", (token_name, node_id))


async def get_node(conn: Connection, node_id: uuid.UUID, for_update: bool = False) -> dict | None:
    if for_update:
        return await one(conn, "SELECT * FROM nodes WHERE id = %s FOR UPDATE", (node_id,))
    return await one(conn, _NODE_SELECT + " WHERE n.id = %s", (node_id,))


async def list_nodes(conn: Connection, *, limit: int, cursor: str | None,
                     selector: dict[str, str] | None = None) -> tuple[list[dict], str | None]:
    where: list[sql.Composable] = []
    params: list[Any] = []
    if selector:
        where.append(sql.SQL("n.labels @> %s"))
        params.append(Jsonb(selector))
    return await page(conn, _NODE_SELECT, where, params, "n", limit, cursor)


async def nodes_by_id(conn: Connection, ids: list[uuid.UUID] | None) -> list[dict]:
    """The nodes with these ids (every node when None), with their count of available models."""
    if ids is None:
        return await all_rows(conn, _NODE_SELECT + " ORDER BY n.created_at, n.id")
    return await all_rows(conn, _NODE_SELECT + " WHERE n.id = ANY(%s) ORDER BY n.created_at, n.id", (ids,))


async def matching_nodes(conn: Connection, selector: dict[str, str]) -> list[dict]:
    return await all_rows(conn, _NODE_SELECT + " WHERE n.labels @> %s ORDER BY n.created_at, n.id",
                          (Jsonb(selector),))


async def touch_node(conn: Connection, node_id: uuid.UUID, facts: dict | None) -> tuple[dict, dict] | None:
    """A heartbeat: last_seen_at now, facts replaced when given; (row, the row before) or None."""
    before = await one(conn, "SELECT * FROM nodes WHERE id = %s FOR UPDATE", (node_id,))
    if before is None:
        return None
    row = await one(conn, """
        UPDATE nodes SET last_seen_at = now(), facts = coalesce(%s, facts),
               updated_at = CASE WHEN %s::jsonb IS NULL THEN updated_at ELSE now() END
         WHERE id = %s RETURNING *""",
                    (Jsonb(facts) if facts is not None else None, Jsonb(facts) if facts is not None else None,
                     node_id))
    return row, before


async def delete_node(conn: Connection, node_id: uuid.UUID) -> dict | None:
    return await one(conn, "DELETE FROM nodes WHERE id = %s RETURNING *", (node_id,))


async def node_token_names(conn: Connection, node_id: uuid.UUID) -> list[str]:
    """Live tokens bound to the node."""
    rows = await all_rows(conn, "SELECT name FROM api_tokens WHERE node_id = %s AND revoked_at IS NULL",
                          (node_id,))
    return [r["name"] for r in rows]


# -- availability -------------------------------------------------------------------

_AVAILABILITY_SELECT = """
    SELECT a.*, v.version, m.name AS model_name, m.vendor AS model_vendor, n.name AS node_name,
           n.created_at AS node_created_at
      FROM node_model_availability a
      JOIN model_versions v ON v.id = a.model_version_id
      JOIN models m ON m.id = v.model_id
      JOIN nodes n ON n.id = a.node_id
"""


async def upsert_availability(conn: Connection, node_id: uuid.UUID, version_id: uuid.UUID, status: str,
                              details: dict) -> tuple[dict, str | None]:
    """Record a node's report; returns the row and the status it had before (None: first report)."""
    before = await one(conn, """SELECT status FROM node_model_availability
                                 WHERE node_id = %s AND model_version_id = %s FOR UPDATE""", (node_id, version_id))
    await conn.execute("""
        INSERT INTO node_model_availability (node_id, model_version_id, status, details, last_checked_at)
        VALUES (%s, %s, %s, %s, now())
        ON CONFLICT ON CONSTRAINT node_model_availability_node_id_model_version_id_key DO UPDATE
           SET status = EXCLUDED.status, details = EXCLUDED.details, last_checked_at = now()""",
                       (node_id, version_id, status, Jsonb(details)))
    row = await one(conn, _AVAILABILITY_SELECT + " WHERE a.node_id = %s AND a.model_version_id = %s",
                    (node_id, version_id))
    return row, before["status"] if before else None


async def availability(conn: Connection, *, node_id: uuid.UUID | None = None,
                       version_ids: list[uuid.UUID] | None = None) -> list[dict]:
    where, params = [], []
    if node_id is not None:
        where.append("a.node_id = %s")
        params.append(node_id)
    if version_ids is not None:
        where.append("a.model_version_id = ANY(%s)")
        params.append(version_ids)
    query = _AVAILABILITY_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    return await all_rows(conn, query + " ORDER BY a.last_checked_at DESC, a.id", params)


# A report's node was registered once and keeps its created_at; the report keeps its id however often it
# is updated: together an order that never changes, so a walk through the pages sees every row once
# (last_checked_at moves with each report).
_AVAILABILITY_PAGE = "SELECT * FROM (" + _AVAILABILITY_SELECT + ") x"


async def list_availability(conn: Connection, *, node_id: uuid.UUID | None, version_id: uuid.UUID | None,
                            limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of reports (of one node, or of one version, or all), by node (oldest registered first)."""
    where, params = equal({"x.node_id": node_id, "x.model_version_id": version_id})
    return await page(conn, _AVAILABILITY_PAGE, where, params, "x", limit, cursor, at="node_created_at")


async def expire_loading(conn: Connection, silent_for: float) -> list[dict]:
    """``loading`` reports silent longer than ``silent_for`` seconds become ``failed``; returns them."""
    return await all_rows(conn, """
        UPDATE node_model_availability
           SET status = 'failed', last_checked_at = now(),
               details = coalesce(details, '{}'::jsonb) || jsonb_build_object('error', %s::text)
         WHERE status = 'loading' AND last_checked_at < now() - make_interval(secs => %s)
        RETURNING node_id, model_version_id""",
                          (f"no report for {silent_for:g}s while loading (nodes.loading_timeout)", silent_for))


# -- load requests ------------------------------------------------------------------

_LOAD_SELECT = """
    SELECT r.*, v.version, m.name AS model_name, m.vendor AS model_vendor,
           a.sha256 AS artifact_sha256, a.size_bytes AS artifact_size_bytes, a.artifact_type
      FROM node_load_requests r
      JOIN model_versions v ON v.id = r.model_version_id
      JOIN models m ON m.id = v.model_id
      LEFT JOIN model_artifacts a ON a.id = r.artifact_id
"""


async def open_load(conn: Connection, node_id: uuid.UUID, version_id: uuid.UUID) -> dict | None:
    return await one(conn, _LOAD_SELECT + " WHERE r.node_id = %s AND r.model_version_id = %s "
                     "AND r.state IN ('pending', 'loading')", (node_id, version_id))


async def insert_load(conn: Connection, node_id: uuid.UUID, version_id: uuid.UUID, artifact_id: uuid.UUID,
                      by: str, placement_id: uuid.UUID | None = None) -> dict | None:
    """A new pending request; None when an open one exists already (the caller reads that one)."""
    row = await one(conn, """
        INSERT INTO node_load_requests (node_id, model_version_id, artifact_id, state, requested_by, placement_id)
        VALUES (%s, %s, %s, 'pending', %s, %s)
        ON CONFLICT (node_id, model_version_id) WHERE state IN ('pending', 'loading') DO NOTHING
        RETURNING id""", (node_id, version_id, artifact_id, by, placement_id))
    return await get_load(conn, row["id"]) if row else None


async def get_load(conn: Connection, load_id: uuid.UUID) -> dict | None:
    return await one(conn, _LOAD_SELECT + " WHERE r.id = %s", (load_id,))


async def loads_of(conn: Connection, node_id: uuid.UUID, states: tuple[str, ...] = OPEN_LOADS) -> list[dict]:
    return await all_rows(conn, _LOAD_SELECT + " WHERE r.node_id = %s AND r.state = ANY(%s) "
                          "ORDER BY r.created_at, r.id", (node_id, list(states)))


async def list_loads(conn: Connection, *, state: str | None, node_id: uuid.UUID | None, limit: int,
                     cursor: str | None) -> tuple[list[dict], str | None]:
    """Load requests of every node (or one), newest first, one page."""
    where, params = equal({"r.state": state, "r.node_id": node_id})
    return await page(conn, _LOAD_SELECT, where, params, "r", limit, cursor, newest_first=True)


async def move_load(conn: Connection, load_id: uuid.UUID, from_states: tuple[str, ...], state: str,
                    error: str | None = None) -> dict | None:
    """Move a request on if it is in one of ``from_states``; None when it is not."""
    row = await one(conn, """
        UPDATE node_load_requests SET state = %s, error = %s, updated_at = now()
         WHERE id = %s AND state = ANY(%s) RETURNING id""", (state, error, load_id, list(from_states)))
    return await get_load(conn, row["id"]) if row else None


async def touch_load(conn: Connection, load_id: uuid.UUID) -> None:
    """A progress report on a loading request: it is not silent."""
    await conn.execute("UPDATE node_load_requests SET updated_at = now() WHERE id = %s", (load_id,))


async def expire_loads(conn: Connection, silent_for: float) -> list[dict]:
    """``loading`` requests without a report for ``silent_for`` seconds become ``failed``; returns them."""
    rows = await all_rows(conn, """
        UPDATE node_load_requests SET state = 'failed', updated_at = now(), error = %s
         WHERE state = 'loading' AND updated_at < now() - make_interval(secs => %s)
        RETURNING id""", (f"no report for {silent_for:g}s while loading (nodes.loading_timeout)", silent_for))
    return [await get_load(conn, r["id"]) for r in rows]


async def cancel_loads_of(conn: Connection, node_id: uuid.UUID, why: str) -> int:
    cur = await conn.execute("""
        UPDATE node_load_requests SET state = 'cancelled', error = %s, updated_at = now()
         WHERE node_id = %s AND state IN ('pending', 'loading')""", (why, node_id))
    return cur.rowcount


async def recent_failures(conn: Connection, node_ids: list[uuid.UUID], version_ids: list[uuid.UUID],
                          within: float) -> dict[tuple[uuid.UUID, uuid.UUID], dict]:
    """(node, version) -> when and why it last failed, for failures in the last ``within`` seconds
    (a failed report, or a failed load request)."""
    cur = await conn.execute("""
        SELECT node_id, model_version_id, last_checked_at AS at, details->>'error' AS error
          FROM node_model_availability
         WHERE status = 'failed' AND node_id = ANY(%(n)s) AND model_version_id = ANY(%(v)s)
           AND last_checked_at > now() - make_interval(secs => %(w)s)
        UNION ALL
        SELECT node_id, model_version_id, updated_at, error FROM node_load_requests
         WHERE state = 'failed' AND node_id = ANY(%(n)s) AND model_version_id = ANY(%(v)s)
           AND updated_at > now() - make_interval(secs => %(w)s)
        ORDER BY at""", {"n": node_ids, "v": version_ids, "w": within})
    rows = await cur.fetchall()
    return {(r["node_id"], r["model_version_id"]): r for r in rows}


# -- versions and artifacts selection needs -------------------------------------------


async def promoted_artifacts(conn: Connection, version_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[dict]]:
    """Promoted artifacts of these versions, oldest first, by version."""
    rows = await all_rows(conn, """
        SELECT id, model_version_id, artifact_type, sha256, size_bytes, created_at FROM model_artifacts
         WHERE model_version_id = ANY(%s) AND state = 'promoted' ORDER BY created_at, id""", (version_ids,))
    out: dict[uuid.UUID, list[dict]] = {v: [] for v in version_ids}
    for r in rows:
        out[r["model_version_id"]].append(r)
    return out


# -- placements -----------------------------------------------------------------------


async def insert_placement(conn: Connection, selector: dict, version_ids: list[uuid.UUID],
                           requirements: dict | None, by: str) -> dict:
    return await one(conn, """
        INSERT INTO placements (selector, model_version_ids, requirements, created_by) VALUES (%s, %s, %s, %s)
        RETURNING *""", (Jsonb(selector), version_ids, Jsonb(requirements) if requirements is not None else None, by))


async def list_placements(conn: Connection, *, limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of placements, oldest first."""
    return await page(conn, "SELECT p.* FROM placements p", [], [], "p", limit, cursor)


async def get_placement(conn: Connection, placement_id: uuid.UUID) -> dict | None:
    return await one(conn, "SELECT * FROM placements WHERE id = %s", (placement_id,))


async def delete_placement(conn: Connection, placement_id: uuid.UUID) -> dict | None:
    return await one(conn, "DELETE FROM placements WHERE id = %s RETURNING *", (placement_id,))


async def placements_for(conn: Connection, labels: dict) -> list[dict]:
    """Placements whose selector the labels satisfy."""
    return await all_rows(conn, "SELECT * FROM placements WHERE %s::jsonb @> selector ORDER BY created_at, id",
                          (Jsonb(labels),))
