"""Registration, heartbeats, availability reports and load requests: every change audited and logged.

Registering mints a ``node`` token bound to the node id, in the same transaction as the node's
row; registering the same id again revokes the token the previous registration minted and mints
another (the secret is shown once, in the answer). Deleting a node revokes every live token bound
to it, cancels its open load requests (kept as history) and removes its availability rows.

Audited: registration, deletion, a heartbeat that changes the node's facts or brings a stale node
back (routine heartbeats are not, or the log would be mostly heartbeats), every availability
report that changes a status, every load request created, acknowledged, finished or timed out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import uuid
from dataclasses import dataclass

from ..auth import Role, Subject
from ..config import Settings
from ..db import Database, audit, models
from ..db import nodes as rows
from ..db import tokens as token_rows
from ..errors import Conflict, DatabaseUnavailable, NotFound
from ..tokens import mint
from . import fit

logger = logging.getLogger(__name__)

SYSTEM = Subject("system", "nodes")  # the loading timeout's subject in the audit log

# What an availability report moves an open load request to.
_LOAD_STATE = {"loading": "loading", "available": "available", "failed": "failed"}


@dataclass(frozen=True)
class Registration:
    node: dict
    secret: str  # the node token's secret: shown once
    token_name: str
    re_registered: bool


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def status_of(node: dict, settings: Settings, at: dt.datetime | None = None) -> str:
    return "stale" if fit.is_stale(node, settings.nodes.heartbeat_timeout, at or now()) else "ready"


def label(node: dict) -> str:
    return f"{node['name']} ({node['id']})"


def version_label(row: dict) -> str:
    name = f"{row['model_vendor']}/{row['model_name']}" if row.get("model_vendor") else row["model_name"]
    return f"{name}:{row['version']}"


async def register(db: Database, node_id: uuid.UUID, name: str, labels: dict[str, str], facts: dict,
                   subject: Subject) -> Registration:
    token_name = f"node-{node_id}-{secrets.token_hex(3)}"
    async with db.transaction() as conn:
        node, before = await rows.upsert_node(conn, node_id, name, labels, facts, str(subject))
        if before is not None and before["token_name"]:
            await token_rows.revoke_token(conn, before["token_name"])
            await audit.audit(conn, subject, "api_token.revoke", "api_token", before["token_name"],
                              reason=f"node {node_id} registered again")
        secret, _ = await mint(conn, name=token_name, role=Role.NODE, subject=subject, node_id=node_id)
        await rows.set_token_name(conn, node_id, token_name)
        await audit.audit(conn, subject, "node.register", "node", str(node_id),
                          outcome="updated" if before else "registered",
                          details={"name": name, "labels": labels, "facts": facts, "token": token_name})
        node = await rows.get_node(conn, node_id)
    logger.info("node %s %s by %s: labels %s, facts %s, token %s", label(node),
                "registered again" if before else "registered", subject, labels, facts, token_name)
    return Registration(node, secret, token_name, before is not None)


async def heartbeat(db: Database, settings: Settings, node_id: uuid.UUID, facts: dict | None,
                    subject: Subject) -> dict:
    async with db.transaction() as conn:
        touched = await rows.touch_node(conn, node_id, facts)
        if touched is None:
            raise NotFound(f"no node {node_id}: register it first (POST /v1/nodes)")
        node, before = touched
        was_stale = fit.is_stale(before, settings.nodes.heartbeat_timeout, now())
        facts_changed = facts is not None and facts != before["facts"]
        if was_stale or facts_changed:
            await audit.audit(conn, subject, "node.heartbeat", "node", str(node_id),
                              outcome="ready" if was_stale else "facts_changed",
                              details={"facts": node["facts"], "was_stale": was_stale})
        node = await rows.get_node(conn, node_id)
    if was_stale:
        logger.info("node %s is ready again (heartbeat after %s)", label(node), fit.silence(before, now()))
    if facts_changed:
        logger.info("node %s facts now %s", label(node), node["facts"])
    return node


async def get(db: Database, node_id: uuid.UUID) -> dict:
    async with db.connection() as conn:
        node = await rows.get_node(conn, node_id)
    if node is None:
        raise NotFound(f"no node {node_id}")
    return node


async def delete(db: Database, node_id: uuid.UUID, subject: Subject) -> dict:
    async with db.transaction() as conn:
        node = await rows.get_node(conn, node_id, for_update=True)
        if node is None:
            raise NotFound(f"no node {node_id}")
        revoked = await rows.node_token_names(conn, node_id)
        for name in revoked:
            await token_rows.revoke_token(conn, name)
            await audit.audit(conn, subject, "api_token.revoke", "api_token", name, reason=f"node {node_id} deleted")
        cancelled = await rows.cancel_loads_of(conn, node_id, "the node was deleted")
        await rows.delete_node(conn, node_id)
        await audit.audit(conn, subject, "node.delete", "node", str(node_id), outcome="deleted",
                          details={"name": node["name"], "revoked_tokens": revoked, "cancelled_loads": cancelled})
    logger.info("node %s deleted by %s: revoked tokens %s, cancelled %d load requests", label(node), subject,
                ", ".join(revoked) or "none", cancelled)
    return node


# -- availability -----------------------------------------------------------------


async def report(db: Database, node_id: uuid.UUID, version_id: uuid.UUID, status: str, details: dict,
                 subject: Subject) -> tuple[dict, dict | None]:
    """Record what a node says it holds; an open load request follows. Returns (availability, load)."""
    async with db.transaction() as conn:
        node = await rows.get_node(conn, node_id, for_update=True)
        if node is None:
            raise NotFound(f"no node {node_id}: register it first (POST /v1/nodes)")
        if await models.get_version(conn, version_id) is None:
            raise NotFound(f"no model version {version_id}")
        row, before = await rows.upsert_availability(conn, node_id, version_id, status, details)
        load = await rows.open_load(conn, node_id, version_id)
        moved = None
        if load is not None and status in _LOAD_STATE and _LOAD_STATE[status] != load["state"]:
            moved = await rows.move_load(conn, load["id"], rows.OPEN_LOADS, _LOAD_STATE[status],
                                         error=details.get("error") if status == "failed" else None)
        elif load is not None:
            await rows.touch_load(conn, load["id"])  # progress: not silent
        if before != status:
            await audit.audit(conn, subject, "node_availability.report", "node", str(node_id), outcome=status,
                              reason=details.get("error") if status == "failed" else None,
                              details={"model_version_id": str(version_id), "version": version_label(row),
                                       "from": before, "to": status, "details": details,
                                       "load_request": str(load["id"]) if load else None})
        if moved is not None:
            await audit.audit(conn, subject, "node_load.update", "node_load_request", str(moved["id"]),
                              outcome=moved["state"], reason=moved["error"],
                              details={"node_id": str(node_id), "from": load["state"], "to": moved["state"]})
    if before != status:
        logger.log(logging.WARNING if status == "failed" else logging.INFO,
                   "node %s: %s %s -> %s%s (reported by %s)", label(node), version_label(row), before or "unknown",
                   status, f": {details['error']}" if status == "failed" and details.get("error") else "", subject)
    return row, moved


async def availability(db: Database, *, node_id: uuid.UUID | None = None,
                       version_id: uuid.UUID | None = None) -> list[dict]:
    async with db.connection() as conn:
        if node_id is not None and await rows.get_node(conn, node_id) is None:
            raise NotFound(f"no node {node_id}")
        if version_id is not None and await models.get_version(conn, version_id) is None:
            raise NotFound(f"no model version {version_id}")
        return await rows.availability(conn, node_id=node_id,
                                       version_ids=[version_id] if version_id is not None else None)


async def list_availability(db: Database, *, node_id: uuid.UUID | None = None, version_id: uuid.UUID | None = None,
                            limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of what nodes hold (of one node, of one version, or all), and the next cursor."""
    async with db.connection() as conn:
        if node_id is not None and await rows.get_node(conn, node_id) is None:
            raise NotFound(f"no node {node_id}")
        if version_id is not None and await models.get_version(conn, version_id) is None:
            raise NotFound(f"no model version {version_id}")
        return await rows.list_availability(conn, node_id=node_id, version_id=version_id, limit=limit,
                                            cursor=cursor)


# -- load requests ----------------------------------------------------------------


async def request_load(conn, node: dict, version_id: uuid.UUID, subject: Subject, *,
                       placement_id: uuid.UUID | None = None, artifact: dict | None = None) -> tuple[dict, bool]:
    """Ask the node to load the version (inside the caller's transaction): the open request for the
    same node and version when there is one (False), else a new pending one (True)."""
    existing = await rows.open_load(conn, node["id"], version_id)
    if existing is not None:
        return existing, False
    if artifact is None:
        version = await models.get_version(conn, version_id)
        if version is None:
            raise NotFound(f"no model version {version_id}")
        artifacts = (await rows.promoted_artifacts(conn, [version_id]))[version_id]
        artifact, why = fit.artifact_for(node["facts"], artifacts, version)
        if artifact is None:
            raise Conflict(f"node {label(node)} cannot load {version_label(version)}: {why}")
    created = await rows.insert_load(conn, node["id"], version_id, artifact["id"], str(subject), placement_id)
    if created is None:  # another request made it meanwhile
        return await rows.open_load(conn, node["id"], version_id), False
    await audit.audit(conn, subject, "node_load.request", "node_load_request", str(created["id"]), outcome="pending",
                      details={"node_id": str(node["id"]), "model_version_id": str(version_id),
                               "version": version_label(created), "artifact": f"sha256:{created['artifact_sha256']}",
                               "placement_id": str(placement_id) if placement_id else None})
    logger.info("node %s asked to load %s (sha256:%s, %s bytes) by %s", label(node), version_label(created),
                created["artifact_sha256"], created["artifact_size_bytes"], subject)
    return created, True


async def create_load(db: Database, node_id: uuid.UUID, version_id: uuid.UUID, subject: Subject) -> tuple[dict, bool]:
    async with db.transaction() as conn:
        node = await rows.get_node(conn, node_id)
        if node is None:
            raise NotFound(f"no node {node_id}")
        return await request_load(conn, node, version_id, subject)


async def open_loads(db: Database, node_id: uuid.UUID) -> list[dict]:
    async with db.connection() as conn:
        if await rows.get_node(conn, node_id) is None:
            raise NotFound(f"no node {node_id}")
        return await rows.loads_of(conn, node_id)


async def wait_for_loads(db: Database, bell, node_id: uuid.UUID, wait: float) -> list[dict]:
    """The node's open requests; when there are none, wait up to ``wait`` seconds for one (woken by
    the bell, never by polling)."""
    deadline = asyncio.get_running_loop().time() + wait
    with bell.waiting(str(node_id)) as event:
        while True:
            event.clear()  # set before the read: anything created after it rings again
            loads = await open_loads(db, node_id)
            left = deadline - asyncio.get_running_loop().time()
            if loads or left <= 0:
                return loads
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return await open_loads(db, node_id)


async def ack(db: Database, node_id: uuid.UUID, load_id: uuid.UUID, subject: Subject) -> dict:
    async with db.transaction() as conn:
        load = await rows.get_load(conn, load_id)
        if load is None or load["node_id"] != node_id:
            raise NotFound(f"no load request {load_id} for node {node_id}")
        if load["state"] == "loading":
            return load
        moved = await rows.move_load(conn, load_id, ("pending",), "loading")
        if moved is None:
            raise Conflict(f"load request {load_id} is {load['state']}: only a pending request can be acknowledged")
        await audit.audit(conn, subject, "node_load.ack", "node_load_request", str(load_id), outcome="loading",
                          details={"node_id": str(node_id), "version": version_label(moved)})
    logger.info("node %s acknowledged load request %s (%s)", node_id, load_id, version_label(moved))
    return moved


async def expire_silent(db: Database, settings: Settings) -> int:
    """``loading`` reports and requests silent past ``nodes.loading_timeout`` become ``failed``."""
    timeout = settings.nodes.loading_timeout
    async with db.transaction() as conn:
        reports = await rows.expire_loading(conn, timeout)
        loads = await rows.expire_loads(conn, timeout)
        for r in reports:
            await audit.audit(conn, SYSTEM, "node_availability.timeout", "node", str(r["node_id"]),
                              outcome="failed", reason=f"no report for {timeout:g}s (nodes.loading_timeout)",
                              details={"model_version_id": str(r["model_version_id"]), "from": "loading",
                                       "to": "failed"})
        for load in loads:
            await audit.audit(conn, SYSTEM, "node_load.timeout", "node_load_request", str(load["id"]),
                              outcome="failed", reason=load["error"],
                              details={"node_id": str(load["node_id"]), "version": version_label(load)})
    for r in reports:
        logger.warning("node %s: version %s loading -> failed: no report for %gs (nodes.loading_timeout)",
                       r["node_id"], r["model_version_id"], timeout)
    for load in loads:
        logger.warning("node %s: load request %s (%s) failed: no report for %gs (nodes.loading_timeout)",
                       load["node_id"], load["id"], version_label(load), timeout)
    return len(reports) + len(loads)


async def expire_forever(db: Database, settings: Settings, stop: asyncio.Event) -> None:
    """The server's periodic task: a few times per loading timeout, at most every 30 s."""
    every = min(30.0, max(0.2, settings.nodes.loading_timeout / 4))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        try:
            await expire_silent(db, settings)
        except DatabaseUnavailable as exc:
            logger.debug("loading timeout check skipped: %s", exc.detail)
