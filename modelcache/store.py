"""The blob store: immutable, content-addressed files on one filesystem.

The whole layout, drawn once::

    <data_dir>/
      blobs/sha256/<hex[:2]>/<hex>   verified, immutable blobs (mode 0444)
      tmp/<random>.partial           in-flight writes, each flock()ed by its writer
      tmp/downloads/<job>.partial    a download's bytes so far, kept across restarts to resume from
      tmp/downloads/<job>/           a multi-file download's staging folder, kept across restarts alike:
        parts/<n>.partial            its file n so far (and <n>.json, the notes to resume it from)
      tmp/downloads/inflight/<hex>.json  a file a download is fetching, announced to other processes'
                                     blob GETs (downloads/inflight.py), removed when its job ends
      quarantine/<hex>               blobs that failed verification, never served
      import/                        the default import folder (storage.import_dir)
      import/.failed/                files that could not be imported, with a reason file
      pg/                            the embedded PostgreSQL, only when no dsn is set

A blob path is built only by :meth:`BlobStore.path_for` from a parsed
:class:`~modelcache.digest.Digest`. Bytes reach ``blobs/`` only by a rename
from ``tmp/`` after they were hashed (and matched, when a digest was
expected) and fsynced, so a crash leaves either no blob or a whole one.
Writers hold an exclusive flock on their temp file: start-up removes every
temp file nobody holds, which is exactly what a crash left behind. The one
deliberate exception is ``tmp/downloads/``: a download's partial file outlives
its process so the next one resumes instead of starting over; it is re-hashed
when resumed and removed by the worker when its job ends.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .digest import Digest
from .errors import ChecksumError, InvalidInput, NotFound, SourceChanged, StorageFull
from .hashing import Hasher, hash_stream

logger = logging.getLogger(__name__)

# told the size of each chunk as it is hashed, from the hashing thread
OnBytes = Callable[[int], object]


@dataclass(frozen=True, slots=True)
class Blob:
    """A committed blob: its digest, size, xxh3-128 fingerprint and path."""

    digest: Digest
    size: int
    xxh3: str
    path: Path


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
# a download's name: its job id, or one file of a multi-file job's staging folder
_DOWNLOAD_NAME = re.compile(r"[A-Za-z0-9-]+(/parts/[0-9]+)?")


@contextmanager
def _room(where: Path, what: str) -> Iterator[None]:
    """A full filesystem (or quota) while writing to the store is a StorageFull naming the data dir;
    the caller's temp file is discarded on the way out, so nothing partial is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        raise StorageFull(f"no room left on the filesystem of {where} while {what} "
                          f"({os.strerror(exc.errno)}): free space there, or lower "
                          "models.cache.max_bytes so eviction keeps it below the disk's size") from None


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempBlob:
    """A file in ``tmp/`` whose bytes are hashed as they are written (or, for a
    hard-linked source, read once).

    Use as a context manager; leaving it without :meth:`BlobStore.commit`
    removes the temp file.
    """

    def __init__(self, store: "BlobStore", linked_from: Path | None = None) -> None:
        self.path = store.tmp_dir / f"{secrets.token_hex(12)}.partial"
        self._root = store.root
        if linked_from is None:
            with _room(self._root, f"creating {self.path}"):
                self._file: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115 - closed in close()
        else:
            os.link(linked_from, self.path)
            self._file = open(self.path, "rb")  # noqa: SIM115
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.hasher = Hasher()

    def write(self, data: bytes | memoryview) -> None:
        assert self._file is not None, "write after close"
        self.hasher.update(data)
        with _room(self._root, self._writing()):
            self._file.write(data)

    def copy_from(self, src: BinaryIO, progress: OnBytes | None = None) -> None:
        """Copy ``src`` to its end, hashing in the same pass."""
        assert self._file is not None and not self.hasher.size
        with _room(self._root, self._writing()):
            self.hasher = hash_stream(src, self._file.write, progress)

    def _writing(self) -> str:
        return f"writing {self.path}"

    def hash_in_place(self, progress: OnBytes | None = None) -> None:
        """Hash a hard-linked temp file: the bytes are read once and never copied."""
        assert self._file is not None and not self.hasher.size
        self.hasher = hash_stream(self._file, progress=progress)

    def stat(self) -> os.stat_result:
        assert self._file is not None
        return os.fstat(self._file.fileno())

    def append(self, data: bytes | memoryview) -> None:
        """:meth:`write`, then hand the bytes to the OS (not fsynced), so readers of the temp file see
        them: a download's blob is streamed to clients from its partial file while it arrives."""
        self.write(data)
        with _room(self._root, self._writing()):
            self._file.flush()  # type: ignore[union-attr]

    def finish(self) -> None:
        """Flush and fsync; after this the bytes on disk are what was hashed."""
        assert self._file is not None
        with _room(self._root, self._writing()):
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None

    def discard(self) -> None:
        try:
            self.close()
        except OSError as exc:
            # closing flushes what is still buffered, which fails again on a full disk; the
            # bytes are being thrown away, and the file is closed all the same
            logger.debug("temp file %s closed with an error before removal: %s", self.path, exc)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "TempBlob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class ResumableTemp(TempBlob):
    """A download's temp file under a stable name: the bytes already there are hashed on open,
    and leaving it (an error, a stop) keeps the file for the next attempt; :meth:`drop` removes it."""

    def __init__(self, path: Path, root: Path, fresh: bool = False, hashed: Hasher | None = None) -> None:
        self.path = path
        self._root = root
        self._file = open(path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise SourceChanged(f"{path}: another process is writing this download") from None
        if fresh:
            self.restart()
        elif hashed is not None:  # the caller hashed these bytes as it wrote them (a download in parts)
            size = self._file.seek(0, os.SEEK_END)
            if size != hashed.size:
                self._file.close()
                raise SourceChanged(f"{path}: holds {size} bytes, {hashed.size} were hashed")
            self.hasher = hashed
        else:
            self._file.seek(0)
            self.hasher = hash_stream(self._file)  # the file's end: appends go on from here

    def restart(self) -> None:
        """Forget the bytes so far (the upstream file changed): empty the file and the hash."""
        assert self._file is not None
        self._file.truncate(0)
        self._file.seek(0)
        self.hasher = Hasher()

    def discard(self) -> None:
        self.close()  # kept: the next attempt resumes from it

    def drop(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    """The store under one data dir. All methods are blocking: call them through a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.blobs_dir = data_dir / "blobs" / "sha256"
        self.tmp_dir = data_dir / "tmp"
        self.downloads_dir = self.tmp_dir / "downloads"
        self.quarantine_dir = data_dir / "quarantine"

    # -- layout ---------------------------------------------------------------

    def path_for(self, digest: Digest) -> Path:
        """The one place a blob's path is made."""
        return self.blobs_dir / digest.hex[:2] / digest.hex

    def prepare(self) -> int:
        """Create the layout and remove what a crash left in ``tmp/``; returns files removed."""
        for path in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self.clean_tmp()

    def clean_tmp(self) -> int:
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            path = Path(entry.path)
            if path == self.downloads_dir:
                continue  # partial downloads are resumed, not cleaned (see the layout above)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            else:
                size = os.fstat(fd).st_size
                path.unlink(missing_ok=True)
                removed += 1
                logger.info("removed leftover temp file %s (%d bytes)", path, size)
            finally:
                os.close(fd)
        return removed

    # -- writing --------------------------------------------------------------

    def temp(self) -> TempBlob:
        return TempBlob(self)

    @property
    def announcement_dir(self) -> Path:
        return self.downloads_dir / "inflight"

    def announcement_path(self, digest: Digest) -> Path:
        """Where a download announces the file ``digest`` it is fetching (``downloads/inflight.py``)."""
        return self.announcement_dir / f"{digest.hex}.json"

    def partial_path(self, name: str) -> Path:
        """The partial file of download ``name``: a job id (``<job>.partial``), or file ``n`` of a
        multi-file job (``<job>/parts/<n>.partial``); its notes are the same path with ``.json``."""
        if not _DOWNLOAD_NAME.fullmatch(name):
            raise InvalidInput(f"invalid download name {name!r}")
        return self.downloads_dir / f"{name}.partial"

    def resumable(self, name: str, fresh: bool = False, hashed: Hasher | None = None) -> ResumableTemp:
        """The partial file of download ``name`` (see :meth:`partial_path`), reopened to resume (or
        emptied: ``fresh``).

        ``hashed``: the whole file was already hashed by its writer; it is not read again."""
        path = self.partial_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return ResumableTemp(path, self.root, fresh, hashed)

    def drop_resumable(self, name: str) -> None:
        """Remove download ``name``'s partial file and its notes, or its staging folder (the job ended)."""
        for suffix in (".partial", ".json"):
            (self.downloads_dir / f"{name}{suffix}").unlink(missing_ok=True)
        if name.replace("-", "").isalnum():
            shutil.rmtree(self.downloads_dir / name, ignore_errors=True)

    def commit(self, temp: TempBlob, expected: Digest | None = None) -> Blob:
        """Rename a finished temp file into place, read-only.

        With ``expected`` the computed digest must match or nothing is kept.
        Committing content that is already stored is a no-op.
        """
        digest = temp.hasher.digest
        if expected is not None and digest != expected:
            temp.discard()
            raise ChecksumError("content", str(expected), str(digest))
        target = self.path_for(digest)
        if target.exists():
            temp.discard()
        else:
            with _room(self.root, f"committing {digest} to {target}"):
                target.parent.mkdir(exist_ok=True)
                os.chmod(temp.path, 0o444)
                os.rename(temp.path, target)
                _fsync_dir(target.parent)
            temp.close()
        return Blob(digest, temp.hasher.size, temp.hasher.xxh3, target)

    def ingest_copy(self, src: Path, expected: Digest | None = None, progress: OnBytes | None = None) -> Blob:
        """Copy a file into the store, hashing in the same read pass; the source is untouched."""
        with open_source(src) as f, self.temp() as temp:
            before = _fingerprint(os.fstat(f.fileno()))
            temp.copy_from(f, progress)
            temp.finish()
            _check_unchanged(src, before, os.fstat(f.fileno()))
            return self.commit(temp, expected)

    def ingest_link(self, src: Path, expected: Digest | None = None, progress: OnBytes | None = None) -> Blob:
        """Take a file into the store by hard link: no copy, the bytes are hashed once in place.

        The source name stays until the caller removes it after the registry
        commit, so a crash at any point loses nothing. Falls back to a copy
        when ``src`` is on another filesystem or has other hard links.
        """
        open_source(src).close()  # the same clear errors as a copy
        if os.stat(src).st_nlink > 1:
            # another name shares the inode: the store must own its inode alone (it is made
            # read-only, and a write through the other name would change a verified blob)
            return self.ingest_copy(src, expected, progress)
        try:
            temp = TempBlob(self, linked_from=src)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                return self.ingest_copy(src, expected, progress)
            raise
        with temp:
            before = _fingerprint(temp.stat())
            temp.hash_in_place(progress)
            temp.finish()
            _check_unchanged(src, before, temp.stat())
            return self.commit(temp, expected)

    # -- reading and checking -------------------------------------------------

    def size_on_disk(self, digest: Digest) -> int | None:
        try:
            return self.path_for(digest).stat().st_size
        except FileNotFoundError:
            return None

    def rehash(self, digest: Digest) -> Hasher:
        """Hash a stored blob again (verification)."""
        with open(self.path_for(digest), "rb") as f:
            return hash_stream(f)

    def quarantine(self, digest: Digest) -> Path:
        """Move a blob out of ``blobs/`` so it can never be served; keeps the bytes for inspection."""
        target = self.quarantine_dir / digest.hex
        os.rename(self.path_for(digest), target)
        _fsync_dir(self.quarantine_dir)
        return target

    def remove(self, digest: Digest) -> None:
        self.path_for(digest).unlink(missing_ok=True)

    def stored(self) -> list[tuple[Digest, float]]:
        """Every blob file in the store with its ctime (a rename into place sets it)."""
        found = []
        for shard in os.scandir(self.blobs_dir):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                try:
                    digest = Digest.from_hex(entry.name)
                except InvalidInput:
                    logger.warning("not a blob, left alone: %s", entry.path)
                    continue
                found.append((digest, entry.stat().st_ctime))
        return found


def open_source(path: Path) -> BinaryIO:
    """Open a user's file for reading, with errors that name it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{path}: not a regular file")
    try:
        return open(path, "rb")
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied") from None


def _check_unchanged(src: Path, before: tuple[int, int, int, int], after_fd: os.stat_result) -> None:
    try:
        now = _fingerprint(os.stat(src))
    except FileNotFoundError:
        raise SourceChanged(f"{src}: removed while it was being read") from None
    if now != before or _fingerprint(after_fd) != before:
        raise SourceChanged(f"{src}: changed while it was being read (size or mtime moved)")
