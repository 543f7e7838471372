"""Files that could not be imported go to ``import/.failed/``, with the reason beside them (blocking).

Nothing is deleted: the file (or folder) is renamed to the same relative path
under ``.failed/`` (in a dated folder if that name is taken), its sidecar with
it, and ``<name>.error.json`` says why and when. The reason file is written
first, so a crash in between leaves the file in place to be tried again.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from pathlib import Path

from ..formats.reader import read_placed_json
from .scan import FAILED_DIR

MAX_REASON_BYTES = 1 << 20  # what move_to_failed writes is a few hundred bytes


def move_to_failed(import_dir: Path, path: Path, companions: tuple[Path, ...], reason: str, error: str,
                   details: dict | None = None) -> Path:
    """Move ``path`` (and ``companions``, e.g. its sidecar) under ``.failed/``; returns the new path.

    Whoever may drop files may also make ``.failed`` (or a folder under it) a symbolic link to
    somewhere else, and this runs with the cache's rights: so each folder below the import folder is
    made and opened without following links (a link there raises OSError naming it, and the daemon
    tries again later), and every write and rename is relative to the folder opened."""
    now = dt.datetime.now(dt.timezone.utc)
    rel = path.relative_to(import_dir)
    folder = _open_below(import_dir, (FAILED_DIR, *rel.parts[:-1]))
    try:
        names = (rel.name, *(c.name for c in companions))
        if _taken(folder, names):
            stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
            inner = _open_below(import_dir, (FAILED_DIR, stamp, *rel.parts[:-1]))
            os.close(folder)
            folder, rel_target = inner, Path(FAILED_DIR, stamp, rel)
        else:
            rel_target = Path(FAILED_DIR, rel)
        record = {
            "file": rel.as_posix(),
            "reason": reason,
            "error": error,
            "time": now.isoformat(timespec="seconds"),
            **(details or {}),
        }
        temp = f".{rel.name}.error.json.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record, indent=2) + "\n")
        except OSError:  # a full disk: no half reason file is left to be listed, the file stays to retry
            os.unlink(temp, dir_fd=folder)
            raise
        os.replace(temp, f"{rel.name}.error.json", src_dir_fd=folder, dst_dir_fd=folder)
        os.rename(path, rel.name, dst_dir_fd=folder)
        for companion in companions:
            if companion.exists():
                os.rename(companion, companion.name, dst_dir_fd=folder)
    finally:
        os.close(folder)
    return import_dir / rel_target


def _open_below(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of ``root/parts...``, each part made if missing and none of them a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = root.joinpath(*parts[:i + 1])
                raise OSError(exc.errno, f"{where} is not a folder (a symbolic link is not followed)") from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _taken(folder: int, names: tuple[str, ...]) -> bool:
    wanted = (*names, f"{names[0]}.error.json")
    for name in wanted:
        try:
            os.stat(name, dir_fd=folder, follow_symlinks=False)
            return True
        except FileNotFoundError:
            pass
    return False


def list_failed(import_dir: Path, limit: int = 200) -> list[dict]:
    """What ``.failed/`` holds, newest first: each ``<name>.error.json`` as written above (file, reason,
    error, time), plus ``path`` (where the file now is, relative to the import folder). A reason file
    that cannot be read is listed with that as its error."""
    failed = import_dir / FAILED_DIR
    if failed.is_symlink():  # what it points at is not ours to walk or show (see _read_reason)
        return [{"file": FAILED_DIR, "reason": "unreadable", "time": None, "path": FAILED_DIR,
                 "error": f"{FAILED_DIR} is a symbolic link: links are not followed"}]
    if not failed.is_dir():
        return []
    found = []
    for error_file in failed.rglob("*.error.json"):
        if error_file.name.startswith("."):
            continue
        rel = error_file.relative_to(import_dir).as_posix().removesuffix(".error.json")
        try:
            record = _read_reason(error_file)
        except (OSError, ValueError) as exc:
            record = {"file": rel, "reason": "unreadable", "error": f"{error_file}: {exc}", "time": None}
        found.append(_shaped(record, rel))
    found.sort(key=lambda r: str(r.get("time") or ""), reverse=True)
    return found[:limit]


def _shaped(record: dict, rel: str) -> dict:
    """The record with file, reason, error and time as text (or None), and path: a reason file may be
    anyone's JSON (see _read_reason), and the overview must render whatever it holds."""
    def text(value: object) -> str | None:
        return value if isinstance(value, str) or value is None else json.dumps(value)

    return {**record, "file": text(record.get("file")) or rel, "reason": text(record.get("reason")) or "unknown",
            "error": text(record.get("error")), "time": text(record.get("time")), "path": rel}


def _read_reason(error_file: Path) -> dict:
    """A reason file's record. Whoever may drop files into the import folder may put anything under
    ``.failed/`` too, and what is listed here is shown to every dashboard reader: so only a regular file
    is read (formats.reader.read_placed_json), and only up to MAX_REASON_BYTES."""
    record = read_placed_json(error_file, MAX_REASON_BYTES)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record
