"""Rows into the registry: an ingested artifact recorded in one transaction, audited, then evictions enforced.

Runs after :mod:`.ingest` has stored every byte; no connection is held while
bytes are hashed. A moved source is removed only after the registry commit,
so a crash at any point leaves the user's file where it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from .. import eviction, preferences
from ..auth import Subject
from ..db import artifacts, audit, blobs, models
from ..db.pool import Database
from ..errors import ImportRejected, ModelcacheError
from ..manifests import derive_quietly
from ..store import BlobStore
from .ingest import Ingested
from .request import ImportRequest, ImportResult

logger = logging.getLogger(__name__)


async def register(db: Database, store: BlobStore, req: ImportRequest, ingested: Ingested,
                   subject: Subject) -> ImportResult:
    """Register what was ingested (the same bytes twice is a no-op), then remove a moved source and enforce eviction."""
    artifact, created = await _record(db, req, ingested, subject)
    derived = await derive_quietly(db, store, artifact["id"])  # /v2's manifests are made here, not on a pull
    if req.move:
        await asyncio.to_thread(_remove_source, req.path, [path for path, _ in ingested.files])
    result = ImportResult(
        artifact_id=artifact["id"], digest=ingested.manifest.digest, size=ingested.size,
        artifact_type=ingested.artifact_type, state=artifact["state"], created=created,
        seconds=time.monotonic() - ingested.started, files=[b for _, b in ingested.files],
        content_capabilities=ingested.content_caps, derived=derived.digests if derived is not None else (),
    )
    logger.info(
        "%s %s as %s (%s): %s, %d bytes in %.2fs (%.0f MB/s)",
        "imported" if created else "already registered", req.path, req.model_label, result.artifact_type,
        result.digest, result.size, result.seconds, result.mb_per_s,
    )
    if created:
        try:
            await eviction.enforce(db, store, keep=artifact["id"])
        except ModelcacheError as exc:  # the import itself is done; the next one enforces again
            logger.error("eviction after importing %s failed: %s", result.digest, exc.detail)
    return result


@asynccontextmanager
async def failures_audited(db: Database, req: ImportRequest, subject: Subject) -> AsyncIterator[None]:
    """Around an ingest and its registration: a failure is logged and audited, then raised on."""
    try:
        yield
    except ModelcacheError as exc:
        where = "" if str(req.path) in exc.detail else f"{req.path}: "
        logger.warning("import failed: %s%s", where, exc.detail)
        await _audit_failure(db, req, subject, exc)
        raise


async def _record(db: Database, req: ImportRequest, ingested: Ingested, subject: Subject) -> tuple[dict, bool]:
    """Record the blobs and the artifact in one transaction; the same bytes twice is a no-op."""
    files, manifest, artifact_type = ingested.files, ingested.manifest, ingested.artifact_type
    digest, size = manifest.digest, ingested.size
    auto_promote = (await preferences.effective(db))["models.import.auto_promote"]
    servable = "promoted" if auto_promote else "staged"  # the state of content that becomes servable
    async with db.transaction() as conn:
        for _, blob in files:
            await blobs.record_blob(conn, blob.digest, blob.size, blob.xxh3)
        if manifest is not files[0][1]:
            await blobs.record_blob(conn, manifest.digest, manifest.size, manifest.xxh3)
        existing = await artifacts.artifact_by_sha256(conn, digest)
        if existing is not None:
            same = (existing["model_name"], existing["model_vendor"], existing["version"]) == (
                req.model, req.vendor, req.version)
            if not same:
                raise ImportRejected(
                    f"{req.path}: the same bytes ({digest}) are already artifact {existing['id']} of "
                    f"{_label(existing)}; one content has one artifact"
                )
            artifact, created, outcome = existing, False, "unchanged"
            if existing["state"] in ("evicted", "quarantined"):  # good bytes are back: servable again
                await artifacts.set_artifact(conn, existing["id"], str(subject), state=servable)
                artifact, created, outcome = {**existing, "state": servable}, True, "restored"
        else:
            model_id = await models.upsert_model(conn, req.model, req.vendor, str(subject))
            version_id = await models.upsert_version(conn, model_id, req.version)
            artifact = await artifacts.insert_artifact(
                conn,
                version_id=version_id,
                artifact_type=artifact_type,
                sha256=digest,
                size=size,
                cache_path=str(manifest.path),
                source_uri=req.source_uri or req.path.resolve().as_uri(),
                state=servable,
                by=str(subject),
            )
            for path, blob in files:
                await artifacts.insert_artifact_file(
                    conn, artifact["id"], path, blob.digest, blob.size,
                    ingested.media_types.get(path) or _media_type(path, artifact_type))
            capabilities = {**ingested.content_caps, **(req.capabilities or {})}
            if capabilities or req.default_parameters:
                await models.merge_version_metadata(conn, version_id, capabilities, req.default_parameters)
            if req.description:
                await models.describe_model(conn, model_id, req.description, str(subject))
            created, outcome = True, "created"
        await audit.audit(
            conn, subject, "model_artifact.import", "model_artifact", str(digest),
            outcome=outcome,
            details={"path": str(req.path), "model": req.model_label, "artifact_type": artifact_type,
                     "size_bytes": size, "state": artifact["state"]},
        )
        # other artifacts quarantined for a blob this import brought back whole are served again too
        for other in await artifacts.restore_quarantined(conn, [str(b.digest) for _, b in files], servable,
                                                         str(subject)):
            await audit.audit(conn, subject, "model_artifact.restore", "model_artifact", f"sha256:{other['sha256']}",
                              outcome="restored", reason=f"its blobs are whole again after the import of {digest}",
                              details={"state": servable})
    return artifact, created


def _media_type(path: str, artifact_type: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    if artifact_type == "gguf" and path.endswith(".gguf"):
        return "application/vnd.ollama.image.model"
    return "application/octet-stream"


def _remove_source(path: Path, ingested: list[str]) -> None:
    """Remove exactly the files that were stored (a file added meanwhile stays), then empty folders."""
    if path.is_dir():
        for name in ingested:
            (path / name).unlink(missing_ok=True)
        for p in sorted(path.rglob("*"), reverse=True):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        if not any(path.iterdir()):
            path.rmdir()
    else:
        os.unlink(path)


def _label(row: dict) -> str:
    name = f"{row['model_vendor']}/{row['model_name']}" if row["model_vendor"] else row["model_name"]
    return f"{name}:{row['version']}"


async def _audit_failure(db: Database, req: ImportRequest, subject: Subject, exc: ModelcacheError) -> None:
    try:
        async with db.connection() as conn:
            await audit.audit(
                conn, subject, "model_artifact.import", "model_artifact", None,
                outcome="failed", reason=exc.detail, details={"path": str(req.path), "model": req.model_label},
            )
    except ModelcacheError as audit_exc:
        logger.error("could not audit the failed import of %s: %s", req.path, audit_exc.detail)
