"""Files that could not be imported go to ``import/.failed/``, with the reason beside them (blocking).

Nothing is deleted: the file (or folder) is renamed to the same relative path
under ``.failed/`` (in a dated folder if that name is taken), its sidecar with
it, and ``<name>.error.json`` says why and when. The reason file is written
first, so a crash in between leaves the file in place to be tried again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from .scan import FAILED_DIR


def move_to_failed(import_dir: Path, path: Path, companions: tuple[Path, ...], reason: str, error: str,
                   details: dict | None = None) -> Path:
    """Move ``path`` (and ``companions``, e.g. its sidecar) under ``.failed/``; returns the new path."""
    now = dt.datetime.now(dt.timezone.utc)
    failed = import_dir / FAILED_DIR
    rel = path.relative_to(import_dir)
    target = failed / rel
    if _taken(target, companions):
        target = failed / now.strftime("%Y%m%dT%H%M%S.%fZ") / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "file": rel.as_posix(),
        "reason": reason,
        "error": error,
        "time": now.isoformat(timespec="seconds"),
        **(details or {}),
    }
    error_file = target.parent / f"{target.name}.error.json"
    temp = target.parent / f".{target.name}.error.json.tmp"
    temp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temp, error_file)
    os.rename(path, target)
    for companion in companions:
        if companion.exists():
            os.rename(companion, target.parent / companion.name)
    return target


def _taken(target: Path, companions: tuple[Path, ...]) -> bool:
    names = [target, target.parent / f"{target.name}.error.json", *(target.parent / c.name for c in companions)]
    return any(os.path.lexists(p) for p in names)
