"""When a file in the import folder is done: settled for long enough, and no writer holds it open.

Settling is measured from what the daemon saw, not from the file's mtime:
rsync, ``cp -p`` and ``scp -p`` set old mtimes, and NFS clients cache
attributes, so only "unchanged across our own observations for
``settle_seconds``" is trustworthy. Where ``/proc`` is readable (Linux, and
the writer runs as our user or we are root), a file still open for writing by
a local process is not settled whatever its age. A writer on another NFS
client cannot be seen; ``settle_seconds`` is the guard there.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .scan import Candidate, Fingerprint

logger = logging.getLogger(__name__)

_O_ACCMODE = 0o3
_O_WRONLY, _O_RDWR = 0o1, 0o2
_SYNC_FILE_RANGE_WRITE = 2


@dataclass
class _Seen:
    fingerprint: Fingerprint
    since: float


class Settler:
    """Remembers each candidate's fingerprint and since when it has not changed."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, _Seen] = {}

    def observe(self, candidates: Iterable[Candidate], now: float) -> list[Candidate]:
        """Record a scan; returns the candidates that have not changed for ``settle_seconds``."""
        settled = []
        present = set()
        for c in candidates:
            present.add(c.path)
            seen = self._seen.get(c.path)
            if seen is None or seen.fingerprint != c.fingerprint:
                self._seen[c.path] = seen = _Seen(c.fingerprint, now)
            if now - seen.since >= self.settle_seconds:
                settled.append(c)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return settled

    def restart(self, path: Path, now: float) -> None:
        """Start the wait again (a writer held it, or it changed while it was hashed)."""
        seen = self._seen.get(path)
        if seen is not None:
            seen.since = now

    def unchanged_since(self, path: Path) -> float | None:
        seen = self._seen.get(path)
        return None if seen is None else seen.since


def open_for_writing(paths: Iterable[Path]) -> dict[Path, int]:
    """Which of ``paths`` some process we can see holds open for writing, with that process's pid.

    Reads ``/proc/<pid>/fd`` links (cheap: about 1,000 readlinks on a quiet
    host) and, for a match only, the descriptor's access mode in ``fdinfo``.
    ``paths`` must be real paths (no symlinks in them), as the kernel reports.
    """
    wanted = {str(p): p for p in paths}
    found: dict[Path, int] = {}
    if not wanted:
        return found
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found  # no /proc: the settle time is the only guard
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            path = wanted.get(target)
            if path is not None and path not in found and _writable(pid, fd):
                found[path] = int(pid)
    return found


def _writable(pid: str, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & _O_ACCMODE in (_O_WRONLY, _O_RDWR)
    except (OSError, ValueError):
        return False
    return False


def start_writeback(paths: Iterable[Path]) -> None:
    """Ask the kernel to start writing the files' dirty pages to disk now, without waiting for it.

    A file that was just written is mostly dirty page cache, and the store
    fsyncs every blob before it commits it: a 4 GiB file then waits about a
    second in that fsync. Started while the file settles, the writeback runs
    beside the hash and the fsync finds little left. Linux's
    sync_file_range(SYNC_FILE_RANGE_WRITE); elsewhere nothing happens.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone or unreadable: the import itself will say so
        try:
            if sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
                logger.debug("sync_file_range on %s failed: %s", path, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)


_libc_sync_file_range: list = []


def _sync_file_range():
    if not _libc_sync_file_range:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _libc_sync_file_range.append(fn)
    return _libc_sync_file_range[0]
