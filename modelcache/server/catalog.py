"""The blob server's in-memory view of the registry.

A blob GET or HEAD answers from here (digest -> size and state, token hash ->
role), never from a query per request. The view is loaded whole at start and
then followed incrementally: LISTEN/NOTIFY (triggers in schema.sql) names each
changed blob, and the same triggers log it in ``blob_changes``, so after a
reconnection, and once a minute as a safety net against a lost notification,
the catalog reads only what changed since it last looked (``changes_since``).
It reloads whole only when that log cannot answer (it was away longer than the
log is kept, or the database was replaced). While PostgreSQL is down the last
view keeps serving.

A million blobs must fit in a few hundred MiB: an entry is one packed int keyed
by the digest's 32 raw bytes (``db/blobs.py``), unpacked into a
:class:`BlobEntry` when asked for.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Awaitable, Callable
from dataclasses import dataclass

from ..auth import Role
from ..db import Database, blobs, tokens
from ..digest import Digest
from ..errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

# Logged changes are kept a day (any server prunes them, at most hourly); a catalog that last caught up
# longer ago than half that reloads whole instead, so pruning never hides a change from it.
CHANGES_KEPT = 86400.0
_PRUNE_EVERY = 3600.0

BLOBS_CHANNEL = "modelcache_blobs"
TOKENS_CHANNEL = "modelcache_tokens"

# A miss on a well-formed digest asks the registry (another process's fresh import is served before
# its notification arrives), but only so much: a few lookups at once, shared by every request for
# one digest, a caller waits a moment at most, and a digest found absent is not asked again for a
# second. So a flood of unknown digests, or a slow or dead database, costs a 404, never a stall.
MISS_LOOKUPS = 4
MISS_WAIT = 0.5
MISS_REMEMBERED = 1.0
_ABSENT_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class BlobEntry:
    size: int
    state: str  # present, quarantined, evicted (blobs.state)
    promoted: bool  # held by at least one promoted artifact


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    node_id: str | None
    expires_at: dt.datetime | None

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class Catalog:
    def __init__(self, db: Database, token_refresh: float = 5.0, blob_refresh: float = 60.0,
                 access_flush: float = 10.0) -> None:
        self._db = db
        self._entries: dict[bytes, int] = {}  # digest bytes -> packed entry (db.blobs)
        self._mark: str | None = None  # the change mark of the last full load or catch-up
        self._caught_up_at = 0.0  # time.monotonic() of that
        self._pruned_at = 0.0
        self.full_loads = 0  # how often every blob was read (start, and when the change log could not answer)
        self.tokens: dict[str, TokenEntry] = {}
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._accessed: dict[str, dt.datetime] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._followers: list[Callable[[list[str] | None], Awaitable[None]]] = []
        # other channels on the same LISTEN connection: channel -> what to call on a notification
        self._channels: dict[str, Callable[[str], None]] = {}
        self._on_reconnect: list[Callable[[], None]] = []
        self._token_refresh = token_refresh
        self._blob_refresh = blob_refresh
        self._access_flush = access_flush
        self._lookups: dict[Digest, asyncio.Task[BlobEntry | None]] = {}  # misses being asked, one per digest
        self._absent: dict[Digest, float] = {}  # digest -> until when a lookup found it absent
        self.registry_lookups = 0  # misses that asked the registry

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load everything (the database must be up), then follow changes in the background."""
        await self.reload()
        self._tasks = [
            asyncio.create_task(self._db.listen([BLOBS_CHANNEL, TOKENS_CHANNEL, *self._channels], self._on_notify,
                                                self._on_connect, self._stop), name="catalog-listen"),
            asyncio.create_task(self._apply_changes(), name="catalog-changes"),
            asyncio.create_task(self._every(self._token_refresh, self._reload_tokens), name="catalog-tokens"),
            asyncio.create_task(self._every(self._blob_refresh, self.catch_up), name="catalog-blobs"),
            asyncio.create_task(self._every(self._access_flush, self.flush_access), name="catalog-access"),
        ]

    def listen(self, channel: str, on_notify: Callable[[str], None], on_reconnect: Callable[[], None]) -> None:
        """Also hear ``channel`` on the catalog's LISTEN connection (one per process): ``on_notify(payload)``
        for each notification, ``on_reconnect()`` after each (re)connection, when some may have been missed.
        Call before :meth:`start`."""
        self._channels[channel] = on_notify
        self._on_reconnect.append(on_reconnect)

    def follow(self, update: Callable[[list[str] | None], Awaitable[None]]) -> None:
        """Also keep another in-memory view current (the HF index): ``update(digests)`` after blobs
        changed (also after a catch-up), ``update(None)`` after every full reload. One LISTEN
        connection serves them all."""
        self._followers.append(update)

    async def _tell_followers(self, digests: list[str] | None) -> None:
        for update in self._followers:
            await update(digests)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for lookup in list(self._lookups.values()):
            lookup.cancel()
        await asyncio.gather(*self._lookups.values(), return_exceptions=True)
        await self._flush_quietly()

    # -- reads on the hot path ------------------------------------------------

    def blob(self, digest: Digest) -> BlobEntry | None:
        packed = self._entries.get(bytes.fromhex(digest.hex))
        if packed is None:
            return None
        return BlobEntry(packed >> 3, blobs.STATES[packed >> 1 & 3], bool(packed & 1))

    def blob_count(self) -> int:
        """How many blobs the catalog knows (in any state)."""
        return len(self._entries)

    def count_by_state(self) -> dict[str, int]:
        counts = [0, 0, 0, 0]
        for packed in list(self._entries.values()):
            counts[packed >> 1 & 3] += 1
        return dict(zip(blobs.STATES, counts))

    def token(self, token_sha256: str) -> TokenEntry | None:
        return self.tokens.get(token_sha256)

    async def lookup(self, digest: Digest) -> BlobEntry | None:
        """The blob's entry from memory, or on a miss from the registry (see MISS_LOOKUPS): None
        when it is not there, or the registry could not say within MISS_WAIT."""
        entry = self.blob(digest)
        if entry is not None:
            return entry
        lookup = self._lookups.get(digest)
        if lookup is None:
            if self._absent.get(digest, 0.0) > time.monotonic() or len(self._lookups) >= MISS_LOOKUPS:
                return None
            lookup = asyncio.create_task(self._look_up(digest), name=f"catalog-lookup-{digest.hex[:12]}")
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
        # waiting neither cancels the lookup nor outlasts MISS_WAIT: it finishes for the next caller
        done, _ = await asyncio.wait({lookup}, timeout=MISS_WAIT)
        return lookup.result() if done else self.blob(digest)  # (found, while it tells the followers)

    async def _look_up(self, digest: Digest) -> BlobEntry | None:
        self.registry_lookups += 1
        try:
            await self.refresh([str(digest)])
        except DatabaseUnavailable as exc:
            logger.info("blob %s: not in the catalog, and the registry could not be asked: %s", digest, exc.detail)
        entry = self.blob(digest)
        if entry is None:
            now = time.monotonic()
            if len(self._absent) >= _ABSENT_KEPT:
                self._absent = {d: t for d, t in self._absent.items() if t > now}
                if len(self._absent) >= _ABSENT_KEPT:
                    self._absent.clear()
            self._absent[digest] = now + MISS_REMEMBERED
            return None
        logger.info("blob %s: registered before its notification arrived; served from now on", digest)
        await self._tell_followers([str(digest)])
        return entry

    def record_access(self, digest: Digest) -> None:
        """Remember a pull; written to the registry in batches, not per request."""
        self._accessed[str(digest)] = dt.datetime.now(dt.timezone.utc)

    # -- loading --------------------------------------------------------------

    async def reload(self) -> None:
        await self._reload_blobs()
        await self._reload_tokens()

    async def _reload_blobs(self) -> None:
        started = time.monotonic()
        async with self._db.connection() as conn:
            entries, mark = await blobs.blob_index(conn)
        self._entries, self._mark, self._caught_up_at = entries, mark, time.monotonic()
        self.full_loads += 1
        logger.info("catalog loaded %d blobs in %.2fs", len(entries), time.monotonic() - started)
        await self._tell_followers(None)

    async def catch_up(self) -> list[str]:
        """Read the blobs changed since the last load or catch-up (the change log), and tell the
        followers; reload whole when the log cannot say. Returns the digests read."""
        if self._mark is None or time.monotonic() - self._caught_up_at > CHANGES_KEPT / 2:
            logger.info("catalog: changes since the last read may be pruned; reloading every blob")
            await self._reload_blobs()
            return []
        started = time.monotonic()
        async with self._db.connection() as conn:
            since = await blobs.changes_since(conn, self._mark)
            if started - self._pruned_at > _PRUNE_EVERY:
                pruned = await blobs.prune_changes(conn, CHANGES_KEPT)
                self._pruned_at = started
                logger.debug("catalog: pruned %d logged blob changes", pruned)
        if since is None:
            logger.warning("catalog: the database does not know the last change mark %s (restored or "
                           "replaced?); reloading every blob", self._mark)
            await self._reload_blobs()
            return []
        digests, mark = since
        if digests:
            await self.refresh(digests)
            await self._tell_followers(digests)
        self._mark, self._caught_up_at = mark, started
        return digests

    async def refresh(self, digests: list[str]) -> None:
        """Read these blobs' entries from the registry now (a notification will say the same later)."""
        async with self._db.connection() as conn:
            found = await blobs.blob_entries(conn, digests)
        for text in digests:
            key = bytes.fromhex(Digest.parse(text).hex)
            if text in found:
                self._entries[key] = found[text]
            else:
                self._entries.pop(key, None)

    async def changed(self, digests: list[str]) -> None:
        """Read these blobs now and update the followers: what a request just changed is served as it
        answers (read-after-write), not when the notification arrives.

        The change is committed when this is called: if PostgreSQL cannot answer now, the request still
        succeeded (its answer must not become a 503, nor a minted token's secret be lost), and this
        server learns of the change from the change log once the database is back."""
        if digests:
            try:
                await self.refresh(digests)
                await self._tell_followers(digests)
            except DatabaseUnavailable as exc:
                logger.warning("%d changed blob(s) will be served as the change log tells, not at once: %s",
                               len(digests), exc.detail)

    async def tokens_changed(self) -> None:
        """Read the tokens now: a token minted or revoked by a request works (or stops) as it answers
        (and, as for :meth:`changed`, when the database is back if it cannot answer now)."""
        try:
            await self._reload_tokens()
        except DatabaseUnavailable as exc:
            logger.warning("tokens will be read again when the database answers, not at once: %s", exc.detail)

    async def _reload_tokens(self) -> None:
        async with self._db.connection() as conn:
            rows = await tokens.live_tokens(conn)
        self.tokens = {
            r["token_sha256"]: TokenEntry(r["name"], Role(r["role"]), str(r["node_id"]) if r["node_id"] else None,
                                          r["expires_at"])
            for r in rows
        }

    async def _on_connect(self) -> None:
        """After each (re)connection of the LISTEN connection: read what was missed meanwhile."""
        for on_reconnect in self._on_reconnect:
            on_reconnect()
        try:
            await self._reload_tokens()
            digests = await self.catch_up()
            if digests:
                logger.info("catalog caught up on %d blobs changed while not listening", len(digests))
        except DatabaseUnavailable as exc:
            logger.warning("catalog catch-up failed, serving the last view: %s", exc.detail)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel in self._channels:
            self._channels[channel](payload)
            return
        if channel == TOKENS_CHANNEL:
            self._dirty.add("")  # tokens are few: reload them all
        else:
            self._dirty.add(payload)
        self._dirty_event.set()

    async def _apply_changes(self) -> None:
        while not self._stop.is_set():
            await self._dirty_event.wait()
            self._dirty_event.clear()
            await asyncio.sleep(0.02)  # let a burst of notifications coalesce
            dirty, self._dirty = self._dirty, set()
            try:
                if "" in dirty:
                    dirty.discard("")
                    await self._reload_tokens()
                if dirty:
                    await self.refresh(sorted(dirty))
                    await self._tell_followers(sorted(dirty))
            except DatabaseUnavailable as exc:
                logger.warning("catalog update failed (%s); the next catch-up reads it", exc.detail)

    async def _every(self, seconds: float, work) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), seconds)
                return
            except TimeoutError:
                pass
            try:
                await work()
            except DatabaseUnavailable as exc:
                logger.debug("periodic %s skipped: %s", work.__name__, exc.detail)

    async def flush_access(self) -> None:
        accessed, self._accessed = self._accessed, {}
        if not accessed:
            return
        try:
            async with self._db.connection() as conn:
                await blobs.touch_blobs(conn, accessed)
        except DatabaseUnavailable:
            for digest, at in accessed.items():  # keep them for the next flush
                self._accessed.setdefault(digest, at)
            raise

    async def _flush_quietly(self) -> None:
        try:
            await self.flush_access()
        except DatabaseUnavailable as exc:
            logger.warning("last-access times of %d blobs not saved: %s", len(self._accessed), exc.detail)

