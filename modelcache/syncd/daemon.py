"""The import daemon: what users drop into the import folder becomes registered, verified artifacts.

Three kinds of task share one event loop:

- the *watcher* (watchfiles; polling with ``syncd.force_polling``) only wakes the scanner;
- the *scanner* lists the import folder (in a thread), tracks how long each
  candidate has been unchanged (:mod:`.settle`) and queues the settled ones;
  it re-scans every tick while something is settling, and every
  ``IDLE_RESCAN_SECONDS`` anyway, in case an event was missed (NFS);
- ``syncd.workers`` *workers* each take one candidate at a time through the one
  import road, :func:`~modelcache.imports.import_path`, whose hashing runs in a
  thread: at most ``workers`` files are hashed at once. An import that takes
  longer than ``syncd.progress_seconds`` logs its progress that often.

Crash safety comes from the road: the file is hard-linked into ``tmp/``,
hashed, renamed into ``blobs/``, registered, and only then removed from the
import folder. A kill at any point leaves the file where the user put it (and
at worst an unreferenced blob, or a temp file that start-up removes); the next
start imports it, or finds it registered already and just removes it. One
window is not covered: a kill in the microseconds while a registered folder
artifact's files are being unlinked leaves the rest of the folder, which the
next start would import as a new, smaller artifact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from watchfiles import Change, awatch

from ..auth import SYNCD
from ..config import Settings
from ..db import audit
from ..db.pool import Database
from ..errors import Conflict, DatabaseUnavailable, InvalidInput, ModelcacheError, NotFound, SourceChanged
from ..imports import ImportResult, import_path
from ..store import BlobStore
from .failed import move_to_failed
from .naming import ImportPlan, plan_import
from .scan import FAILED_DIR, Candidate, Fingerprint, scan
from .settle import Settler, open_for_writing, start_writeback

logger = logging.getLogger(__name__)

IDLE_RESCAN_SECONDS = 30.0
MAX_RETRY_SECONDS = 60.0
# below this, starting the writeback early saves less than it costs
WRITEBACK_MIN_BYTES = 64 << 20


class SyncDaemon:
    """Watches ``settings.import_dir`` between :meth:`start` and :meth:`stop`."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.import_dir = settings.import_dir
        self.store = BlobStore(settings.data_dir)
        self.workers = settings.syncd.workers
        self.force_polling = settings.syncd.force_polling
        self.progress_seconds = settings.syncd.progress_seconds
        self._settler = Settler(settings.syncd.settle_seconds)
        # while something settles, look again often enough that the wait overshoots by little
        self.tick = max(0.05, min(0.25, settings.syncd.settle_seconds / 10))
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._queue: asyncio.Queue[Candidate | None] = asyncio.Queue()
        self._in_flight: set[Path] = set()
        self._retry: dict[Path, tuple[float, float]] = {}  # path -> (monotonic time to try again, last delay)
        self._told: dict[Path, str] = {}  # the last "waiting" message logged for a path
        self._written_back: dict[Path, Fingerprint] = {}  # what start_writeback was last asked for
        self._writeback: asyncio.Task | None = None
        self._watching = False
        self._loops: list[asyncio.Task] = []
        self._workers: list[asyncio.Task] = []

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.import_dir = await asyncio.to_thread(self._prepare)
        self._loops = [
            asyncio.create_task(self._watch(), name="syncd-watch"),
            asyncio.create_task(self._scan_loop(), name="syncd-scan"),
        ]
        self._workers = [asyncio.create_task(self._work(), name=f"syncd-worker-{i}") for i in range(self.workers)]
        logger.info("watching the import folder %s (%s; settle %.1fs; %d workers)", self.import_dir,
                    "polling" if self.force_polling else "inotify", self._settler.settle_seconds, self.workers)

    async def stop(self) -> None:
        """Stop watching; imports in progress finish (a hash cannot be interrupted), queued ones are left."""
        if not self._loops:
            return
        self._stop.set()
        self._wakeup.set()
        await asyncio.gather(*self._loops)
        if self._writeback is not None:
            await self._writeback
        while not self._queue.empty():
            left = self._queue.get_nowait()
            if left is not None:
                self._in_flight.discard(left.path)
        if self._in_flight:
            logger.info("waiting for %d import(s) in progress to finish: %s", len(self._in_flight),
                        ", ".join(str(p) for p in sorted(self._in_flight)))
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._workers)
        self._loops, self._workers = [], []
        logger.info("stopped watching the import folder %s", self.import_dir)

    def _prepare(self) -> Path:
        (self.import_dir / FAILED_DIR).mkdir(parents=True, exist_ok=True)
        removed = self.store.prepare()
        if removed:
            logger.info("removed %d temp file(s) an interrupted import left in %s", removed, self.store.tmp_dir)
        # /proc reports real paths; so do our scans from here on
        return self.import_dir.resolve()

    # -- watching and scanning --------------------------------------------------

    async def _watch(self) -> None:
        root = str(self.import_dir)

        def interesting(change: Change, path: str) -> bool:
            rel = os.path.relpath(path, root)
            return not any(part.startswith(".") for part in rel.split(os.sep))

        while not self._stop.is_set():
            try:
                self._watching = True
                async for _ in awatch(self.import_dir, watch_filter=interesting, stop_event=self._stop,
                                      force_polling=self.force_polling, step=50, recursive=True,
                                      ignore_permission_denied=True):
                    self._wakeup.set()
            except (OSError, RuntimeError) as exc:
                self._watching = False
                logger.error("cannot watch the import folder %s (%s); scanning it every %.1fs until I can",
                             self.import_dir, exc, self.tick * 8)
                await _wait(self._stop, 5.0)
        self._watching = False

    async def _scan_loop(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            scanned = time.monotonic()
            try:
                settling = await self._scan_once()
            except OSError as exc:
                logger.error("cannot scan the import folder %s: %s", self.import_dir, exc)
                settling = True
            except Exception:  # a bug must not stop the daemon: log it and look again
                logger.exception("unexpected error scanning the import folder %s", self.import_dir)
                settling = True
            if settling:
                timeout = self.tick
            else:
                timeout = IDLE_RESCAN_SECONDS if self._watching else self.tick * 8
            await _wait(self._wakeup, timeout)
            # a burst of events (a thousand files dropped at once) costs one scan per tick, not one per event
            await _wait(self._stop, scanned + self.tick - time.monotonic())

    async def _scan_once(self) -> bool:
        """Queue what has settled; True while something is still settling (so look again soon)."""
        candidates = await asyncio.to_thread(scan, self.import_dir)
        now = time.monotonic()
        settled = {c.path for c in self._settler.observe(candidates, now)}
        settling = False
        ready = []
        for c in candidates:
            if c.path in self._in_flight:
                continue
            if c.waiting:
                self._tell(c.path, c.waiting)
                continue
            retry = self._retry.get(c.path)
            if c.path not in settled or (retry is not None and retry[0] > now):
                settling = True
                continue
            ready.append(c)
        present = {c.path for c in candidates}
        for memo in (self._told, self._retry, self._written_back):
            for gone in [p for p in memo if p not in present]:
                del memo[gone]
        self._start_writeback(candidates, now)
        if ready:
            writers = await asyncio.to_thread(open_for_writing, [f for c in ready for f in c.files])
            for c in ready:
                held = next(((f, writers[f]) for f in c.files if f in writers), None)
                if held is not None:
                    self._settler.restart(c.path, now)
                    self._tell(c.path, f"{held[0]} is open for writing (process {held[1]})")
                    settling = True
                    continue
                self._told.pop(c.path, None)
                self._in_flight.add(c.path)
                self._queue.put_nowait(c)
        return settling

    def _start_writeback(self, candidates: list[Candidate], now: float) -> None:
        """Big files that stopped changing get their writeback started while they settle (see settle.py)."""
        if self._writeback is not None and not self._writeback.done():
            return  # one at a time; the next scan picks up the rest
        due = [c for c in candidates
               if c.kind != "reject" and not c.waiting and c.path not in self._in_flight
               and self._written_back.get(c.path) != c.fingerprint
               and (self._settler.unchanged_since(c.path) or now) < now
               and sum(size for _, _, size, _ in c.fingerprint) >= WRITEBACK_MIN_BYTES]
        if due:
            for c in due:
                self._written_back[c.path] = c.fingerprint
            files = [f for c in due for f in c.files]
            self._writeback = asyncio.create_task(asyncio.to_thread(start_writeback, files), name="syncd-writeback")

    def _tell(self, path: Path, message: str) -> None:
        if self._told.get(path) != message:
            self._told[path] = message
            logger.info("not importing %s yet: %s", path, message)

    # -- importing ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            candidate = await self._queue.get()
            if candidate is None:
                return
            try:
                await self._import(candidate)
            except Exception:  # a bug must not stop the daemon: log it, try the file again later
                logger.exception("unexpected error importing %s", candidate.path)
                self._retry_later(candidate.path, "unexpected error")
            finally:
                self._in_flight.discard(candidate.path)

    async def _import(self, c: Candidate) -> None:
        if c.kind == "reject":
            await self._refuse(c, InvalidInput(f"{c.path}: {c.reason}"))
            return
        try:
            plan = await asyncio.to_thread(plan_import, self.import_dir, c)
        except InvalidInput as exc:
            await self._refuse(c, exc)
            return
        except FileNotFoundError:
            return  # moved away while we looked; the next scan sees what is there
        try:
            result = await import_path(self.db, self.store, plan.request, SYNCD, files=plan.files,
                                       progress=ProgressLog(c.path, self.progress_seconds))
        except SourceChanged:
            logger.info("%s changed while it was being imported; it is imported once it settles again", c.path)
            self._settler.restart(c.path, time.monotonic())
            self._wakeup.set()
            return
        except NotFound:
            logger.info("%s disappeared before it was imported", c.path)
            return
        except (DatabaseUnavailable, Conflict) as exc:
            self._retry_later(c.path, exc.detail)
            return
        except ModelcacheError as exc:
            await self._fail(c, exc, plan)
            return
        except OSError as exc:
            self._retry_later(c.path, f"{exc.strerror or exc}")
            return
        self._retry.pop(c.path, None)
        await asyncio.to_thread(_clean_up, plan, result)

    async def _refuse(self, c: Candidate, exc: ModelcacheError) -> None:
        """A failure before the import road (a bad name or sidecar): audited here, then like any failure."""
        try:
            async with self.db.connection() as conn:
                await audit.audit(conn, SYNCD, "model_artifact.import", "model_artifact", None,
                                     outcome="failed", reason=exc.detail, details={"path": str(c.path)})
        except ModelcacheError as audit_exc:
            logger.error("could not audit the failed import of %s: %s", c.path, audit_exc.detail)
        await self._fail(c, exc, None)

    async def _fail(self, c: Candidate, exc: ModelcacheError, plan: ImportPlan | None) -> None:
        companions = (c.sidecar,) if c.kind == "file" and c.sidecar is not None else ()
        details = {"model": plan.request.model_label} if plan is not None else {}
        try:
            target = await asyncio.to_thread(move_to_failed, self.import_dir, c.path, companions, exc.detail,
                                             type(exc).__name__, details)
        except OSError as move_exc:
            logger.error("could not import %s: %s; and could not move it to %s either: %s", c.path, exc.detail,
                         self.import_dir / FAILED_DIR, move_exc)
            self._retry_later(c.path, "could not move it to .failed")
            return
        logger.warning("could not import %s; moved it to %s: %s", c.path, target, _without_path(exc.detail, c.path))

    def _retry_later(self, path: Path, reason: str) -> None:
        _, last = self._retry.get(path, (0.0, 0.0))
        delay = min(MAX_RETRY_SECONDS, max(1.0, last * 2))
        self._retry[path] = (time.monotonic() + delay, delay)
        self._wakeup.set()  # so the scanner keeps ticking until it is due
        logger.warning("could not import %s for now (%s); trying again in %.0fs", path, reason, delay)


class ProgressLog:
    """Logs an import's progress every ``interval`` seconds, so a file that takes longer than that is seen moving.

    Called from the hashing thread with the bytes done and in all.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self.path, self.interval = path, interval
        self.started = self.logged = time.monotonic()

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.logged < self.interval:
            return
        self.logged = now
        rate = done / 1e6 / (now - self.started) if now > self.started else 0.0
        if total:
            logger.info("importing %s: %d of %d bytes (%.0f%%), %.0f MB/s", self.path, done, total,
                        100 * done / total, rate)
        else:
            logger.info("importing %s: %d bytes, %.0f MB/s", self.path, done, rate)


def _clean_up(plan: ImportPlan, result: ImportResult) -> None:
    """After a successful import (which removed the imported files): the consumed sidecars go."""
    req = plan.request
    for meta in plan.metadata:  # only what was this artifact's alone: never a modelcache.json of shared defaults
        meta.unlink(missing_ok=True)
    if req.path.is_dir():
        for d in sorted((p for p in req.path.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        if not any(req.path.iterdir()):
            req.path.rmdir()
    logger.debug("cleaned up after importing %s as %s", req.path, result.digest)


def _without_path(detail: str, path: Path) -> str:
    """A reason without the path it starts with, for a log line that names the path already."""
    prefix = f"{path}: "
    return detail[len(prefix):] if detail.startswith(prefix) else detail


async def _wait(event: asyncio.Event, timeout: float) -> None:
    if timeout <= 0:
        return
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
