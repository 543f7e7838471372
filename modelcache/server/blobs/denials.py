"""Denied blob pulls (401 and 403 on ``/v1/blobs``, ``/v2`` blobs, ``/hf`` resolve): counted at once,
audited in batches.

Every management action is audited, allowed or denied; a pull is not a management action, and a
client retrying a pull it may not make must not cost a database write per request (nor go
unrecorded). As last-access times are (``Catalog.record_access``), denials are gathered in memory
per subject, blob (or path, when the digest is not known yet), status and reason, and written
every few seconds as one ``blob.pull`` audit row each, whose details hold the count and the
first and last time. While PostgreSQL is down they wait for the next flush. At most
:data:`MAX_KEYS` different ones are kept between flushes; more are added up in one row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from ...auth import Subject
from ...db import Database, audit
from ...errors import DatabaseUnavailable, Forbidden, Unauthorized
from ...logs import printable
from ..keys import DATABASE, DIGEST, METRICS, SUBJECT

logger = logging.getLogger(__name__)

MAX_KEYS = 10_000
FLUSH_SECONDS = 10.0

DENIALS: web.AppKey["Denials"] = web.AppKey("blob_pull_denials")

# (subject type, subject id, resource, status, reason)
_Key = tuple[str, str | None, str, int, str]
_OVERFLOW: _Key = ("anonymous", None, "(many)", 0, "more different denials than are kept between flushes")


@dataclass
class _Seen:
    count: int
    first: dt.datetime
    last: dt.datetime


class Denials:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: dict[_Key, _Seen] = {}

    def record(self, subject: Subject, resource: str, status: int, reason: str) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        key: _Key = (subject.type, subject.id, resource, status, reason)
        if key not in self._pending and len(self._pending) >= MAX_KEYS:
            key = _OVERFLOW
        seen = self._pending.get(key)
        if seen is None:
            self._pending[key] = _Seen(1, now, now)
        else:
            seen.count += 1
            seen.last = now

    async def flush(self) -> None:
        """Write what was gathered: one audit row per subject, resource, status and reason."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            async with self._db.transaction() as conn:
                for (stype, sid, resource, status, reason), seen in pending.items():
                    await audit.audit(conn, Subject(stype, sid), "blob.pull", "blob", resource, decision="deny",
                                      outcome="denied", reason=reason,
                                      details={"status": status, "count": seen.count,
                                               "first": seen.first.isoformat(), "last": seen.last.isoformat()})
        except DatabaseUnavailable:
            for key, seen in pending.items():  # kept for the next flush
                mine = self._pending.setdefault(key, seen)
                if mine is not seen:
                    mine.count, mine.first = mine.count + seen.count, seen.first
            raise


Handler = Callable[..., Awaitable[web.StreamResponse]]


def pull(handler: Handler) -> Handler:
    """A blob route (``handler(request, ...)``) whose 401s and 403s are counted and audited (in batches)."""

    @functools.wraps(handler)
    async def handle(request: web.Request, *args: object) -> web.StreamResponse:
        try:
            return await handler(request, *args)
        except (Unauthorized, Forbidden) as exc:
            subject = request.get(SUBJECT) or Subject("anonymous", request.remote)
            digest = request.get(DIGEST)
            resource = str(digest) if digest is not None else printable(request.path)[:300]
            request.app[METRICS].pulls_denied.labels(str(exc.status)).inc()
            request.app[DENIALS].record(subject, resource, exc.status, printable(exc.detail)[:500])
            raise

    return handle


def setup(app: web.Application) -> None:
    app[DENIALS] = Denials(app[DATABASE])
    app.cleanup_ctx.append(_flush_ctx)


async def _flush_ctx(app: web.Application) -> AsyncIterator[None]:
    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await _flush_quietly(app[DENIALS])

    task = asyncio.create_task(flush_forever(), name="blob-denials-flush")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await _flush_quietly(app[DENIALS])


async def _flush_quietly(denials: Denials) -> None:
    try:
        await denials.flush()
    except DatabaseUnavailable as exc:
        logger.warning("denied blob pulls not audited yet (kept for the next flush): %s", exc.detail)
