"""Re-hash every blob (``modelcache verify --all`` and the periodic scrub, ``storage.scrub_interval``)."""

from __future__ import annotations

import asyncio
import logging
import time

from . import artifacts
from .auth import Subject
from .db import Database, blobs
from .digest import Digest
from .errors import DatabaseUnavailable
from .store import BlobStore

logger = logging.getLogger(__name__)

SCRUB = Subject("scrub", "scrub")


async def scrub(db: Database, store: BlobStore, subject: Subject = SCRUB) -> list[artifacts.BlobCheck]:
    started = time.monotonic()
    async with db.connection() as conn:
        present = await blobs.present_blobs(conn)
    checks = [await artifacts.verify_blob(db, store, Digest.parse(b["digest"]), subject) for b in present]
    bad = [c for c in checks if not c.ok]
    total = sum(b["size_bytes"] for b in present)
    logger.log(logging.ERROR if bad else logging.INFO, "scrub: %d blobs, %d bytes in %.1fs; %d quarantined",
               len(checks), total, time.monotonic() - started, len(bad))
    return checks


async def scrub_forever(db: Database, store: BlobStore, interval: float, stop: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        try:
            await scrub(db, store)
        except DatabaseUnavailable as exc:
            logger.warning("scrub skipped: %s", exc.detail)
