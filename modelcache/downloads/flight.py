"""Single-flight and the per-source cap: which queued job may start, and a job whose twin fetched it already.

Two jobs for the same content (the same source and reference, or the same
expected sha256) share one transfer. The rule lives in the claim: a job is
not started while a *twin* requested before it is still queued or running
(checked in the registry, so it holds across processes too); when the twin
has completed, the waiting job takes its result instead of fetching again.

One content has one artifact (``imports/register.py`` refuses the same bytes
under another model or version), so the follower is not registered again: it
completes with the leader's digest and artifact. When it asked for another
model or version, the audit event ``model_download.share`` and its log line
say which model and version the content is registered under; an admin can
move or rename that artifact, the bytes are in the cache either way.

A source's ``max_concurrent`` caps the jobs of that source one process runs
at once; the others stay queued until one ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from ..config import Settings
from ..db import Database, artifacts, audit, downloads
from ..db.pool import Connection
from ..digest import Digest
from ..store import BlobStore
from .requests import RESOURCE, label, requester

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shared:
    """A job's result taken from the twin that fetched the same content (what ``_complete`` records)."""

    digest: Digest
    artifact_id: uuid.UUID
    size: int


async def may_start(conn: Connection, settings: Settings, row: dict, running_sources: list[str]) -> bool:
    """Whether a claimable job may start now: its source is under its cap and no earlier twin is active."""
    source = settings.sources.get(row["source"])
    if source is not None and running_sources.count(row["source"]) >= source.max_concurrent:
        return False
    return await downloads.earlier_twin(conn, row) is None


async def shared_result(db: Database, store: BlobStore, job: dict) -> Shared | None:
    """The result of a twin that completed while ``job`` waited, if its blob is still in the cache."""
    async with db.connection() as conn:
        twin = await downloads.shared_twin(conn, job)
        if twin is None or twin["sha256"] is None:
            return None
        digest = Digest.parse(twin["sha256"])
        artifact = await artifacts.artifact_by_sha256(conn, digest)
    if artifact is None or not await asyncio.to_thread(store.path_for(digest).exists):
        return None  # evicted meanwhile: fetch it again
    mine, theirs = label(job), label(artifact)
    note = None if mine == theirs else f"the same content is artifact {artifact['id']} of {theirs}; one content " \
                                       f"has one artifact, so it is not registered again as {mine}"
    async with db.connection() as conn:
        await audit.audit(conn, requester(job), "model_download.share", RESOURCE, str(job["id"]), outcome="running",
                          reason=note, details={"source": job["source"], "reference": job["reference"],
                                                "shared_with": str(twin["id"]), "digest": str(digest),
                                                "artifact_id": str(artifact["id"])})
    logger.info("download %s: %s:%s was fetched by download %s while this one waited: %s%s", job["id"],
                job["source"], job["reference"], twin["id"], digest, f" ({note})" if note else "")
    return Shared(digest, artifact["id"], artifact["size_bytes"])
