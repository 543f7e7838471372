"""Start-up clean-up of blob files a crash left without a purpose.

Two kinds: a file committed to the store whose registry transaction never
happened (a crash between the two), and the file of an evicted blob whose
unlink never happened (a crash after the eviction committed). Unregistered
files are removed only once they are older than ``min_age`` seconds, so an
import in progress in another process (between its commit and its registry
transaction) is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .artifacts import remove_if_evicted
from .db import Database, blobs
from .store import BlobStore

logger = logging.getLogger(__name__)

DEFAULT_MIN_AGE = 6 * 3600.0


async def sweep(db: Database, store: BlobStore, min_age: float = DEFAULT_MIN_AGE) -> list[str]:
    """Remove orphaned and evicted blob files; returns their digests."""
    stored = await asyncio.to_thread(store.stored)
    removed: list[str] = []
    now = time.time()
    for start in range(0, len(stored), 1000):
        batch = stored[start:start + 1000]
        async with db.connection() as conn:
            states = await blobs.blob_states(conn, [str(d) for d, _ in batch])
        for digest, ctime in batch:
            state = states.get(str(digest))
            if state is None and now - ctime >= min_age:
                await asyncio.to_thread(store.remove, digest)
                logger.warning("removed blob %s: on disk since %s but never registered (an interrupted import)",
                               digest, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctime)))
                removed.append(str(digest))
            elif state == "evicted" and await remove_if_evicted(db, store, digest):
                logger.info("removed blob %s: evicted, its file was left by an interrupted eviction", digest)
                removed.append(str(digest))
    if removed:
        logger.info("sweep: removed %d blob files that no artifact needs", len(removed))
    return removed
