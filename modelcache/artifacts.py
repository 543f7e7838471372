"""Artifact actions: promote, pin, unpin, evict, verify. Each is audited with who, what and the outcome.

Shared by the management API, the eviction policy and the scrub. Blocking
work (hashing, unlinking) runs in threads with no connection held.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from .auth import Subject
from .db import Database, artifacts, audit, blobs
from .digest import Digest
from .errors import Conflict, NotFound
from .manifests import derive_quietly
from .store import BlobStore

logger = logging.getLogger(__name__)


def parse_artifact_ref(text: str) -> tuple[uuid.UUID | None, str | None]:
    """An artifact is named by its id or by its digest (``sha256:<hex>``)."""
    if text.startswith("sha256:"):
        return None, Digest.parse(text).hex
    try:
        return uuid.UUID(text), None
    except ValueError:
        from .errors import InvalidInput

        raise InvalidInput(f"invalid artifact reference {text!r}: expected an id (UUID) or sha256:<hex>") from None


async def load(db: Database, ref: str) -> dict:
    artifact_id, sha256 = parse_artifact_ref(ref)
    async with db.connection() as conn:
        row = await artifacts.get_artifact(conn, artifact_id, sha256)
        if row is None:
            raise NotFound(f"no artifact {ref}")
        row["files"] = (await artifacts.artifact_files(conn, [row["id"]]))[row["id"]]
    return row


async def promote(db: Database, store: BlobStore, ref: str, subject: Subject) -> dict:
    """Make an artifact visible to nodes; only when every blob was hashed and matched and is on disk."""
    artifact = await load(db, ref)
    for f in artifact["files"]:
        problem = None
        if f["blob_state"] != "present" or f["verified_at"] is None:
            problem = f"blob {f['blob_digest']} is {f['blob_state']}, not verified and present"
        elif await asyncio.to_thread(store.size_on_disk, Digest.parse(f["blob_digest"])) != f["size_bytes"]:
            problem = f"blob {f['blob_digest']} is missing on disk or has the wrong size; run verify"
        if problem:
            await _audit(db, subject, "model_artifact.promote", artifact, outcome="refused", reason=problem)
            raise Conflict(f"cannot promote artifact {artifact['id']}: {problem}")
    if artifact["state"] not in ("staged", "promoted"):
        reason = f"artifact is {artifact['state']}"
        await _audit(db, subject, "model_artifact.promote", artifact, outcome="refused", reason=reason)
        raise Conflict(f"cannot promote artifact {artifact['id']}: {reason}")
    await _change(db, subject, "model_artifact.promote", artifact, state="promoted")
    await derive_quietly(db, store, artifact["id"])  # /v2's manifests, if an earlier attempt failed
    logger.info("promoted artifact %s (sha256:%s) by %s", artifact["id"], artifact["sha256"], subject)
    return await load(db, str(artifact["id"]))


async def set_pinned(db: Database, ref: str, pinned: bool, subject: Subject) -> dict:
    artifact = await load(db, ref)
    await _change(db, subject, "model_artifact.pin" if pinned else "model_artifact.unpin", artifact, pinned=pinned)
    logger.info("%s artifact %s (sha256:%s) by %s", "pinned" if pinned else "unpinned", artifact["id"],
                artifact["sha256"], subject)
    return await load(db, str(artifact["id"]))


@dataclass(frozen=True)
class Eviction:
    artifact_id: uuid.UUID
    freed_bytes: int
    removed_blobs: list[str]


async def evict(db: Database, store: BlobStore, ref: str, subject: Subject, reason: str) -> Eviction:
    """Remove an artifact's bytes from the store, keeping its registry row (state ``evicted``).

    Pinned artifacts and artifacts a node is loading are refused; a blob
    another live artifact holds is kept. Rows change first, files go after
    the commit, so a row never points at a missing file.
    """
    artifact_id, sha256 = parse_artifact_ref(ref)
    async with db.transaction() as conn:
        artifact = await artifacts.get_artifact(conn, artifact_id, sha256, for_update=True)
        if artifact is None:
            raise NotFound(f"no artifact {ref}")
        refusal = None
        if artifact["pinned"]:
            refusal = "it is pinned"
        elif artifact["state"] == "evicted":
            refusal = "it is already evicted"
        elif nodes := await artifacts.artifact_in_use(conn, artifact["id"]):
            refusal = f"node {', '.join(nodes)} is loading it"
        if refusal is None:
            unshared = await artifacts.unshared_blobs(conn, artifact["id"])
            for blob in unshared:
                await blobs.set_blob_state(conn, blob["digest"], "evicted")
            await artifacts.set_artifact(conn, artifact["id"], str(subject), state="evicted")
            freed = sum(b["size_bytes"] for b in unshared)
            await audit.audit(conn, subject, "model_artifact.evict", "model_artifact", _resource(artifact),
                                 outcome="evicted", reason=reason,
                              details={"freed_bytes": freed, "removed_blobs": [b["digest"] for b in unshared]})
    if refusal is not None:
        await _audit(db, subject, "model_artifact.evict", artifact, outcome="refused", reason=refusal)
        raise Conflict(f"cannot evict artifact {artifact['id']}: {refusal}")
    for blob in unshared:
        await remove_if_evicted(db, store, Digest.parse(blob["digest"]))
    logger.info("evicted artifact %s (sha256:%s, %s): freed %d bytes in %d blobs by %s (%s)", artifact["id"],
                artifact["sha256"], _label(artifact), freed, len(unshared), subject, reason)
    return Eviction(artifact["id"], freed, [b["digest"] for b in unshared])


async def remove_if_evicted(db: Database, store: BlobStore, digest: Digest) -> bool:
    """Unlink an evicted blob's file, re-checked under its row lock: an import of the same bytes
    may have brought it back since the eviction committed."""
    async with db.transaction() as conn:
        if await blobs.lock_blob_state(conn, str(digest)) != "evicted":
            return False
        await asyncio.to_thread(store.remove, digest)
    return True


async def remove_unregistered(db: Database, store: BlobStore, digests: list[Digest]) -> list[Digest]:
    """Unlink blob files an ingest committed and will not register (a download whose files did not make
    the artifact declared), each re-checked under its row lock as eviction is: a blob the registry
    holds (another artifact's, one imported meanwhile) stays; a row-less or evicted one goes now rather
    than at the next start-up's sweep. (A row-less blob is not locked: an import of the same bytes between
    its commit and its registration would lose the file, which is why the worker checks the artifact's
    digest before committing and comes here only when that check could not tell.)"""
    removed = []
    for digest in dict.fromkeys(digests):
        async with db.transaction() as conn:
            if await blobs.lock_blob_state(conn, str(digest)) not in (None, "evicted"):
                continue
            await asyncio.to_thread(store.remove, digest)
        removed.append(digest)
        logger.info("removed blob %s: committed by a download whose artifact was refused, held by no artifact",
                    digest)
    return removed


@dataclass(frozen=True)
class BlobCheck:
    digest: str
    ok: bool
    reason: str | None = None


async def verify_blob(db: Database, store: BlobStore, digest: Digest, subject: Subject) -> BlobCheck:
    """Re-hash one blob; a mismatch, a size change or a missing file quarantines it at once."""
    async with db.connection() as conn:
        row = await blobs.blob_row(conn, str(digest))
    if row is None:
        raise NotFound(f"blob {digest} is not in the registry")
    if row["state"] != "present":
        return BlobCheck(str(digest), row["state"] != "quarantined", f"blob is {row['state']}")
    try:
        hasher = await asyncio.to_thread(store.rehash, digest)
    except FileNotFoundError:
        reason = "the file is missing"
    else:
        if hasher.size != row["size_bytes"]:
            reason = f"size changed: expected {row['size_bytes']} bytes, found {hasher.size}"
        elif hasher.digest != digest:
            reason = f"content changed: expected {digest}, got {hasher.digest}"
        else:
            async with db.connection() as conn:
                await blobs.mark_verified(conn, str(digest))
            return BlobCheck(str(digest), True)
    await _quarantine(db, store, digest, subject, reason)
    return BlobCheck(str(digest), False, reason)


async def _quarantine(db: Database, store: BlobStore, digest: Digest, subject: Subject, reason: str) -> None:
    try:
        moved = await asyncio.to_thread(store.quarantine, digest)
    except FileNotFoundError:
        moved = None
    async with db.transaction() as conn:
        await blobs.set_blob_state(conn, str(digest), "quarantined")
        held_by = await artifacts.artifacts_of_blob(conn, str(digest))
        for artifact in held_by:
            if artifact["state"] != "evicted":
                await artifacts.set_artifact(conn, artifact["id"], str(subject), state="quarantined")
        await audit.audit(conn, subject, "blob.quarantine", "blob", str(digest), outcome="quarantined",
                             reason=reason, details={"moved_to": str(moved) if moved else None,
                                                     "artifacts": [str(a["id"]) for a in held_by]})
    logger.error("QUARANTINED blob %s: %s; moved to %s; artifacts %s no longer served", digest, reason,
                 moved or "(file missing)", ", ".join(str(a["id"]) for a in held_by) or "none")


async def verify_artifact(db: Database, store: BlobStore, ref: str, subject: Subject) -> dict:
    artifact = await load(db, ref)
    checks = [await verify_blob(db, store, Digest.parse(f["blob_digest"]), subject) for f in artifact["files"]]
    ok = all(c.ok for c in checks)
    await _audit(db, subject, "model_artifact.verify", artifact, outcome="ok" if ok else "quarantined",
                 reason=None if ok else "; ".join(f"{c.digest}: {c.reason}" for c in checks if not c.ok))
    return {"artifact": await load(db, ref), "ok": ok,
            "blobs": [{"digest": c.digest, "ok": c.ok, "reason": c.reason} for c in checks]}


async def _change(db: Database, subject: Subject, action: str, artifact: dict, **changes) -> None:
    async with db.transaction() as conn:
        await artifacts.set_artifact(conn, artifact["id"], str(subject), **changes)
        await audit.audit(conn, subject, action, "model_artifact", _resource(artifact), outcome="ok",
                             details={k: v for k, v in changes.items()})


async def _audit(db: Database, subject: Subject, action: str, artifact: dict, outcome: str,
                 reason: str | None = None) -> None:
    async with db.connection() as conn:
        await audit.audit(conn, subject, action, "model_artifact", _resource(artifact), outcome=outcome,
                             reason=reason)


def _resource(artifact: dict) -> str:
    return f"sha256:{artifact['sha256']}"


def _label(artifact: dict) -> str:
    name = f"{artifact['model_vendor']}/{artifact['model_name']}" if artifact["model_vendor"] else \
        artifact["model_name"]
    return f"{name}:{artifact['version']}"
