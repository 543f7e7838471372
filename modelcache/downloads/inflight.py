"""The files this process is fetching right now, by the digest their upstream declared: what a blob GET
for content still being fetched streams from (``server/blobs/inflight.py``).

A job's plan declares each file's sha256 and size before any byte moves (``plans.py``); an ``http`` job
declares its one file when it was asked with an expected sha256 and the upstream answered a size (without
one, no client can name the file before it is whole: its digest is not known yet). The worker
registers them here for the job's life (:meth:`InFlight.job`) and tells each :class:`FlightFile`
how far its partial file's contiguous prefix has reached the disk (``grew``), that the file's
transfer started over (``restarted``: the bytes sent so far may be of another version), and how it
ended (``verified`` or ``failed``). A reader waits on :meth:`FlightFile.changed`.

"As they arrive and verified": the sha256 of a file is known only once its last byte is hashed, so
bytes are handed out as they reach the disk, and a response's last byte only after the whole file
matched its declared digest; a mismatch (or a stop, or a restart) aborts every response still
sending, so a client never holds a complete-looking wrong body.

The registry is in memory, one per process. For a ``serve`` beside a separate ``modelcache fetchd``,
each file is also *announced* on disk, ``tmp/downloads/inflight/<hex>.json`` (:meth:`BlobStore.announcement_path`):
its job, declared size, partial file, how far its verified-to-be-contiguous bytes reach, whether it
matched, the writer's pid and a heartbeat, rewritten at most every ``ANNOUNCE_SECONDS`` while it
changes and every ``BEAT_SECONDS`` regardless, and removed when the job ends (after its blobs were
committed). :class:`AnnouncedFile` is the reader's side: the same state as a :class:`FlightFile`,
polled from the announcement; an announcement gone means the blob is in the store (verified) or the
download ended without it, and a heartbeat older than ``STALE_SECONDS`` means its process is gone —
either way what was not verified is not completed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..digest import Digest
from ..store import BlobStore

logger = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 0.1  # an announcement follows its file's progress at most this often
BEAT_SECONDS = 1.0  # and is rewritten this often regardless, as a heartbeat
STALE_SECONDS = 5.0  # a heartbeat older than this: the announcing process is gone
MAX_ANNOUNCEMENT = 64 << 10  # an announcement is a few hundred bytes


class FlightFile:
    """One file of a running job, declared ``size`` bytes with ``digest``, written to ``path``."""

    def __init__(self, job_id: uuid.UUID, digest: Digest, size: int, promoted: bool) -> None:
        self.job_id = job_id
        self.digest = digest
        self.size = size
        self.promoted = promoted  # as its artifact will be (models.import.auto_promote), for Subject.withheld
        self.path: Path | None = None  # the partial file, once its transfer started
        self.available = 0  # bytes from 0 that are on disk in ``path``
        self.generation = 0  # bumped when the file starts over: bytes of an older generation are void
        self.verified = False
        self.failure: str | None = None
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """An event set at the next change (wait on it after reading the state it follows)."""
        return self._changed

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def started(self, path: Path, available: int) -> None:
        if self.path is not None and available < self.available:
            self.restarted(path)
        self.path, self.available = path, available
        self._signal()

    def grew(self, available: int) -> None:
        if available > self.available:
            self.available = available
            self._signal()

    def restarted(self, path: Path) -> None:
        """The partial file was emptied (the upstream's file changed): what was read of it is void."""
        self.path, self.available, self.generation = path, 0, self.generation + 1
        self._signal()

    def moved(self, path: Path) -> None:
        """The verified file was renamed (into the staging folder's ``files/``)."""
        self.path = path

    def verify(self) -> None:
        self.verified = True
        self._signal()

    def fail(self, reason: str) -> None:
        if not self.verified and self.failure is None:
            self.failure = reason
            self._signal()

    @property
    def state(self) -> str:
        return "promoted" if self.promoted else "staged"

    def release(self) -> None:
        """A reader is done with it (nothing to let go of: the writer's own object)."""

    def announcement(self) -> dict[str, Any]:
        """What other processes' blob GETs read of it (``heartbeat`` added when written)."""
        return {"job": str(self.job_id), "digest": str(self.digest), "size": self.size, "promoted": self.promoted,
                "path": str(self.path) if self.path is not None else None, "available": self.available,
                "generation": self.generation, "verified": self.verified}


@dataclass
class FlightJob:
    """A running job's files, and for an ollama layout the manifest the registry served (byte for byte).

    ``paths``: each file's path in the artifact and its declared digest (what ``/hf/.../resolve/...`` of a
    repository still being fetched streams by); ``artifact``: the digest the artifact will have, once every
    file's digest is known (declared, or verified for a file the upstream declares none of): its ``/hf``
    commit id, which a client must be told with the first file it gets."""

    job_id: uuid.UUID
    files: dict[Digest, FlightFile] = field(default_factory=dict)
    manifest: bytes | None = None
    promoted: bool = False
    paths: dict[str, Digest] = field(default_factory=dict)
    artifact: Digest | None = None

    def file(self, digest: Digest | None) -> FlightFile | None:
        return self.files.get(digest) if digest is not None else None


class InFlight:
    """digest -> the file a running job is fetching, per data dir (tests run several caches in one process)."""

    def __init__(self) -> None:
        self._files: dict[tuple[Path, Digest], FlightFile] = {}
        self._jobs: dict[uuid.UUID, FlightJob] = {}
        self._announcers: set[asyncio.Task] = set()

    def file(self, root: Path, digest: Digest) -> FlightFile | None:
        return self._files.get((root, digest))

    def job_of(self, job_id: uuid.UUID) -> FlightJob | None:
        return self._jobs.get(job_id)

    @contextmanager
    def job(self, root: Path, job_id: uuid.UUID, files: list[tuple[Digest, int]], promoted: bool,
            manifest: bytes | None = None, paths: dict[str, Digest] | None = None) -> Iterator[FlightJob]:
        """Register a job's declared files for as long as it runs; on the way out every file not verified
        fails (the job failed, was cancelled or stopped), which aborts the responses still sending it."""
        flight = FlightJob(job_id, manifest=manifest, promoted=promoted, paths=dict(paths or {}))
        for digest, size in files:
            if (root, digest) in self._files or digest in flight.files:
                continue  # another job (or another path of this one) fetches the same bytes: it serves them
            flight.files[digest] = self._files[(root, digest)] = FlightFile(job_id, digest, size, promoted)
        self._jobs[job_id] = flight
        reason = f"download {job_id} stopped before this file was verified"
        stop = asyncio.Event()
        announcer = asyncio.get_running_loop().create_task(_announce(BlobStore(root), flight, stop),
                                                          name=f"announce-{job_id}")
        self._announcers.add(announcer)
        announcer.add_done_callback(self._announcers.discard)
        try:
            yield flight
        except BaseException as exc:
            reason = f"download {job_id} ended: {getattr(exc, 'detail', None) or type(exc).__name__}"
            raise
        finally:
            stop.set()  # the announcements go (the job's blobs are committed by now, or never will be)
            self._jobs.pop(job_id, None)
            for digest, f in flight.files.items():
                f.fail(reason)
                if self._files.get((root, digest)) is f:
                    del self._files[(root, digest)]


FLIGHTS = InFlight()  # this process's running downloads


# -- announcements, for the blob GETs of other processes ----------------------------


async def _announce(store: BlobStore, flight: FlightJob, stop: asyncio.Event) -> None:
    """Keep each file's announcement current while the job runs; remove them when it ends."""
    written: dict[Digest, dict] = {}
    beat = 0.0
    try:
        while True:
            now = time.monotonic()
            due = now - beat >= BEAT_SECONDS
            changed = {d: f.announcement() for d, f in flight.files.items()
                       if due or written.get(d) != f.announcement()}
            if changed:
                await asyncio.to_thread(_write_announcements, store, changed)
                written.update(changed)
                beat = now if due else beat
            try:
                await asyncio.wait_for(stop.wait(), ANNOUNCE_SECONDS)
                return
            except TimeoutError:
                pass
    except OSError as exc:  # a full or read-only disk: only other processes' streaming is lost
        logger.warning("download %s: cannot announce its files in flight (%s); a separate serve answers them "
                       "once committed", flight.job_id, exc)
    finally:
        await asyncio.shield(asyncio.to_thread(_remove_announcements, store, flight.job_id, list(flight.files)))


def _write_announcements(store: BlobStore, states: dict[Digest, dict]) -> None:
    for digest, state in states.items():
        path = store.announcement_path(digest)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        text = json.dumps({**state, "pid": os.getpid(), "heartbeat": time.time()})
        try:
            tmp.write_text(text)
        except FileNotFoundError:  # the folder goes when the last announcement does (another job's end)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
        tmp.replace(path)


def _remove_announcements(store: BlobStore, job_id: uuid.UUID, digests: list[Digest]) -> None:
    for digest in digests:
        path = store.announcement_path(digest)
        if (read_announcement(path) or {}).get("job") == str(job_id):  # not another job's, of the same bytes
            path.unlink(missing_ok=True)
    try:
        store.announcement_dir.rmdir()  # nothing of a download is left behind once none runs
    except OSError:
        pass


def read_announcement(path: Path) -> dict | None:
    """An announcement as written, or None (absent, or caught half-replaced: read again later; or not one
    the writer makes: a link, a FIFO, more than MAX_ANNOUNCEMENT bytes, which are never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # absent, or a symbolic link (ELOOP)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, MAX_ANNOUNCEMENT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        state = json.loads(raw) if len(raw) <= MAX_ANNOUNCEMENT else None
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def remove_stale_announcements(store: BlobStore) -> int:
    """Announcements a killed process left (heartbeat stale), and the ``.tmp`` of one killed while it
    rewrote one: removed when a worker starts, and the folder with them once empty."""
    removed = 0
    try:
        entries = list(os.scandir(store.announcement_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.endswith(".json"):
            state = read_announcement(Path(entry.path))
            stale = state is not None and _stale(state)
        else:  # a writer's .tmp, replacing its announcement within milliseconds unless the writer died
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
            except FileNotFoundError:
                stale = False
        if stale:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    try:
        store.announcement_dir.rmdir()  # as when the last job ends: nothing of a download is left behind
    except OSError:
        pass
    return removed


class AnnouncedFile:
    """A file another process (``fetchd``) is fetching, as its announcement says: what a blob GET streams.

    The same fields and :meth:`changed` as a :class:`FlightFile`, followed by polling the announcement
    every ``ANNOUNCE_SECONDS`` once a reader waits on it (:meth:`release` stops that). When the
    announcement goes, the file is verified if its blob is in the store, else it failed."""

    def __init__(self, store: BlobStore, state: dict) -> None:
        self.store = store
        self.digest = Digest.parse(state["digest"])
        self.size = _count(state["size"])
        self.promoted = bool(state["promoted"])
        self.job = str(state["job"])
        self.path: Path | None = None
        self.available = 0
        self.generation = 0
        self.verified = False
        self.failure: str | None = None
        self._changed = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._follow(state)

    @classmethod
    async def find(cls, store: BlobStore, digest: Digest) -> "AnnouncedFile | None":
        """The file ``digest`` if a live process announces it, else None."""
        state = await asyncio.to_thread(read_announcement, store.announcement_path(digest))
        try:
            if state is None or state.get("digest") != str(digest) or _stale(state):
                return None
            return cls(store, state)
        except _UNREADABLE:
            return None

    @property
    def state(self) -> str:
        return "promoted" if self.promoted else "staged"

    def changed(self) -> asyncio.Event:
        if self._poller is None and self.failure is None and not self.verified:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"follow-{self.digest}")
        return self._changed

    def release(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _follow(self, state: dict) -> None:
        path = Path(state["path"]) if state.get("path") else None
        if path is not None and (not path.is_relative_to(self.store.downloads_dir) or ".." in path.parts):
            self.failure = f"its announcement names {path}, outside {self.store.downloads_dir}"
            return
        generation = _count(state["generation"])
        available = _count(state["available"])
        if available > self.size:
            raise ValueError(f"{available} bytes available of a {self.size}-byte file")
        if (path, available, generation, bool(state["verified"])) != (
                self.path, self.available, self.generation, self.verified):
            self.path, self.available, self.generation = path, available, generation
            self.verified = bool(state["verified"])
            self._signal()

    async def _poll(self) -> None:
        announcement = self.store.announcement_path(self.digest)
        blob = self.store.path_for(self.digest)
        loop = asyncio.get_running_loop()
        read_at = loop.time()  # when the announcement was last read as this job's
        while self.failure is None and not self.verified:
            await asyncio.sleep(ANNOUNCE_SECONDS)
            state = await asyncio.to_thread(read_announcement, announcement)
            if state is None:
                if not await asyncio.to_thread(announcement.exists):
                    if await asyncio.to_thread(blob.exists):  # committed: verified, and whole
                        self.available, self.verified = self.size, True
                    else:
                        self.failure = f"download {self.job} ended without this blob"
                    self._signal()
                elif loop.time() - read_at > STALE_SECONDS:  # not caught half-replaced: it stays unreadable
                    self.failure = f"its announcement {announcement} has not been readable for {STALE_SECONDS:.0f}s"
                    self._signal()
                continue  # caught half-replaced: read again
            read_at = loop.time()
            try:
                if state.get("job") != self.job:  # this job's went, and another's came before a poll saw it
                    raise ValueError(f"it now announces download {state.get('job')!r}, not {self.job}")
                if _stale(state):
                    self.failure = (f"the process fetching it (download {self.job}, pid {state.get('pid')}) has "
                                    f"not announced progress for {STALE_SECONDS:.0f}s")
                    self._signal()
                    continue
                self._follow(state)
            except _UNREADABLE as exc:
                self.failure = f"its announcement cannot be followed ({exc})"
                self._signal()


# what a malformed announcement raises when read: never a 500, never a reader left waiting
_UNREADABLE = (KeyError, TypeError, ValueError, OverflowError)
_MAX_COUNT = 1 << 63  # no file, offset or generation is this large


def _count(value: Any) -> int:
    """A size, offset or generation from an announcement: a whole number a file can have."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_COUNT:
        raise ValueError(f"{value!r} is not a byte count")
    return value


def _stale(state: dict) -> bool:
    """A heartbeat older than STALE_SECONDS; one that is not a time (or is in the future: not a clock
    this host keeps) says nothing of its writer being alive either."""
    heartbeat = state.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or not math.isfinite(heartbeat):
        return True
    return abs(time.time() - heartbeat) > STALE_SECONDS
