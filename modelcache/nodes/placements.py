"""Placements: which model versions a labelled group of nodes should hold, kept true by reconciling.

A placement is a label selector (a node matches when its labels include every pair) and either
model version ids or capability requirements; requirements stand for the newest version meeting
them that has a promoted artifact, resolved again at each reconcile (so a newer import is picked
up). Reconciling makes a load request for each matching node that neither has the version
``available`` nor an open request for it, nor failed it within ``nodes.failure_backoff`` (so a
node that cannot load it is not asked again and again). It runs when a placement is created, and
for one node when it registers or sends a heartbeat — so a node that joins later is warmed too.
A node is *ready* for a placement when every version of it is ``available`` there.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ..auth import Subject
from ..config import Settings
from ..db import Database, audit, models
from ..db import nodes as rows
from ..errors import Conflict, NotFound
from . import fit
from .registry import now, request_load

logger = logging.getLogger(__name__)


async def create(db: Database, settings: Settings, selector: dict[str, str], version_ids: list[uuid.UUID],
                 requirements: dict[str, Any] | None, subject: Subject) -> tuple[dict, list[dict]]:
    """Store a placement and reconcile every matching node; returns it and the load requests made."""
    async with db.transaction() as conn:
        for version_id in version_ids:
            if await models.get_version(conn, version_id) is None:
                raise NotFound(f"no model version {version_id}")
        placement = await rows.insert_placement(conn, selector, version_ids, requirements, str(subject))
        await audit.audit(conn, subject, "placement.create", "placement", str(placement["id"]),
                          details={"selector": selector, "model_version_ids": [str(v) for v in version_ids],
                                   "requirements": requirements})
    logger.info("placement %s created by %s: nodes %s hold %s", placement["id"], subject, selector or "(all)",
                ", ".join(map(str, version_ids)) or f"the newest version meeting {requirements}")
    made = []
    async with db.connection() as conn:
        nodes = await rows.matching_nodes(conn, selector)
    for node in nodes:
        made += await reconcile_node(db, settings, node["id"], subject, only=[placement])
    return placement, made


async def resolve(conn, placement: dict) -> list[uuid.UUID]:
    """The versions a placement stands for now."""
    if placement["requirements"] is None:
        return list(placement["model_version_ids"])
    found, _ = await models.list_versions(conn, model_id=None, model=None, vendor=None, version=None,
                                          requires=placement["requirements"], promoted_only=True, limit=200,
                                          cursor=None)
    return [found[-1]["id"]] if found else []


async def reconcile_node(db: Database, settings: Settings, node_id: uuid.UUID, subject: Subject, *,
                         only: list[dict] | None = None) -> list[dict]:
    """Make the load requests the placements matching this node call for; returns those made."""
    made = []
    async with db.transaction() as conn:
        node = await rows.get_node(conn, node_id)
        if node is None:
            return []
        placements = only if only is not None else await rows.placements_for(conn, node["labels"])
        for placement in placements:
            version_ids = await resolve(conn, placement)
            if not version_ids:
                continue
            held = {a["model_version_id"]: a["status"]
                    for a in await rows.availability(conn, node_id=node_id, version_ids=version_ids)}
            failed = await rows.recent_failures(conn, [node_id], version_ids, settings.nodes.failure_backoff)
            for version_id in version_ids:
                if held.get(version_id) == "available" or (node_id, version_id) in failed:
                    continue
                if await rows.open_load(conn, node_id, version_id) is not None:
                    continue
                try:
                    async with conn.transaction():  # a savepoint: one version the node cannot take skips only it
                        load, created = await request_load(conn, node, version_id, subject,
                                                           placement_id=placement["id"])
                except Conflict as exc:
                    logger.warning("placement %s: %s", placement["id"], exc.detail)
                    continue
                if created:
                    made.append(load)
    return made


async def list_with_counts(db: Database, settings: Settings, *, limit: int,
                           cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of placements, oldest first, each with the versions it stands for now and how many matching
    nodes are ready; and the next cursor."""
    async with db.connection() as conn:
        page, next_cursor = await rows.list_placements(conn, limit=limit, cursor=cursor)
        return [await _counted(conn, settings, p) for p in page], next_cursor


async def with_counts(db: Database, settings: Settings, placement_id: uuid.UUID) -> dict:
    """One placement, counted as :func:`list_with_counts` counts it."""
    async with db.connection() as conn:
        placement = await rows.get_placement(conn, placement_id)
        if placement is None:
            raise NotFound(f"no placement {placement_id}")
        return await _counted(conn, settings, placement)


async def _counted(conn, settings: Settings, placement: dict) -> dict:
    version_ids = await resolve(conn, placement)
    nodes = await rows.matching_nodes(conn, placement["selector"])
    held = await rows.availability(conn, version_ids=version_ids) if version_ids else []
    available = {(a["node_id"], a["model_version_id"]) for a in held if a["status"] == "available"}
    ready = [n for n in nodes if version_ids and all((n["id"], v) in available for v in version_ids)]
    return {**placement, "resolved_version_ids": version_ids, "nodes_matching": len(nodes),
            "nodes_ready": len(ready),
            "nodes_stale": sum(fit.is_stale(n, settings.nodes.heartbeat_timeout, now()) for n in nodes)}


async def delete(db: Database, placement_id: uuid.UUID, subject: Subject) -> dict:
    """Forget a placement; load requests it made stay (and finish or fail as they will)."""
    async with db.transaction() as conn:
        row = await rows.delete_placement(conn, placement_id)
        if row is None:
            raise NotFound(f"no placement {placement_id}")
        await audit.audit(conn, subject, "placement.delete", "placement", str(placement_id),
                          details={"selector": row["selector"]})
    logger.info("placement %s deleted by %s", placement_id, subject)
    return row
