"""The files this process is fetching right now, by the digest their upstream declared: what a blob GET
for content still being fetched streams from (``server/blobs/inflight.py``).

A job's plan declares each file's sha256 and size before any byte moves (``plans.py``). The worker
registers them here for the job's life (:meth:`InFlight.job`) and tells each :class:`FlightFile`
how far its partial file's contiguous prefix has reached the disk (``grew``), that the file's
transfer started over (``restarted``: the bytes sent so far may be of another version), and how it
ended (``verified`` or ``failed``). A reader waits on :meth:`FlightFile.changed`.

"As they arrive and verified": the sha256 of a file is known only once its last byte is hashed, so
bytes are handed out as they reach the disk, and a response's last byte only after the whole file
matched its declared digest; a mismatch (or a stop, or a restart) aborts every response still
sending, so a client never holds a complete-looking wrong body.

The registry is in memory, one per process: only the process running the transfer (``modelcache
run``, where the server and the worker share one event loop) streams it. A separate ``modelcache
fetchd`` serves nothing, and a ``serve`` beside it answers such a blob only once it is committed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..digest import Digest

logger = logging.getLogger(__name__)


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
        try:
            yield flight
        except BaseException as exc:
            reason = f"download {job_id} ended: {getattr(exc, 'detail', None) or type(exc).__name__}"
            raise
        finally:
            self._jobs.pop(job_id, None)
            for digest, f in flight.files.items():
                f.fail(reason)
                if self._files.get((root, digest)) is f:
                    del self._files[(root, digest)]


FLIGHTS = InFlight()  # this process's running downloads
