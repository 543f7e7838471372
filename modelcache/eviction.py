"""Keep the store within ``models.cache.max_bytes`` after every import, upload or download.

``lru`` evicts the least recently pulled artifacts first (pulls are recorded
in batches by the server), ``largest_first`` the largest, ``none`` evicts
nothing and refuses new content that does not fit. Pinned artifacts and
artifacts a node is loading are never evicted; a blob another live artifact
holds is kept (see :func:`modelcache.artifacts.evict`).
"""

from __future__ import annotations

import logging
import uuid

from . import artifacts, preferences
from .auth import Subject
from .db import Database, artifacts as artifact_rows, blobs
from .errors import Conflict, ModelcacheError
from .store import BlobStore

logger = logging.getLogger(__name__)

POLICY = Subject("policy", "eviction")


class CacheFull(ModelcacheError):
    status = 507
    title = "Cache full"


async def admit(db: Database, incoming_bytes: int) -> None:
    """Refuse content that cannot fit under the ``none`` policy, before any byte is written."""
    prefs = await preferences.effective(db)
    if prefs["models.cache.evict_policy"] != "none":
        return
    async with db.connection() as conn:
        used = await blobs.cache_usage(conn)
    limit = int(prefs["models.cache.max_bytes"])
    if used + incoming_bytes > limit:
        raise CacheFull(f"the cache holds {used} of {limit} bytes and the eviction policy is 'none': "
                        f"{incoming_bytes} more bytes do not fit; evict something or raise models.cache.max_bytes")


async def enforce(db: Database, store: BlobStore, keep: uuid.UUID | None = None) -> int:
    """Evict by policy until the store is within its limit; returns bytes freed."""
    prefs = await preferences.effective(db)
    policy, limit = prefs["models.cache.evict_policy"], int(prefs["models.cache.max_bytes"])
    async with db.connection() as conn:
        used = await blobs.cache_usage(conn)
        if used <= limit or policy == "none":
            return 0
        candidates = await artifact_rows.eviction_candidates(conn, policy)
    freed = 0
    for candidate in candidates:
        if used - freed <= limit:
            break
        if candidate["id"] == keep:
            continue
        try:
            done = await artifacts.evict(db, store, str(candidate["id"]), POLICY,
                                         reason=f"{policy}: cache over models.cache.max_bytes = {limit}")
        except Conflict as exc:
            logger.info("eviction skipped artifact %s: %s", candidate["id"], exc.detail)
            continue
        freed += done.freed_bytes
    if used - freed > limit:
        logger.warning("cache still holds %d bytes over its limit of %d: nothing else may be evicted "
                       "(pinned, in use, or the newest import)", used - freed - limit, limit)
    return freed
