"""One pass over the import folder: what could be imported, and what it waits for (blocking).

What is seen where::

    import/
      .failed/                       never looked at (our own)
      .anything, *.partial, *.tmp    ignored: rsync, curl and browsers write under such names
      x.gguf  x.gguf.json            a file and its sidecar (the sidecar is never imported alone)
      modelcache.json                defaults for the files beside it
      llama3/8b/x.gguf               a file; names from the folder convention (see naming.py)
      qwen/7b/{config.json,*.safetensors,...}
                                     a folder artifact: a Hugging Face snapshot ...
      mine/1/{modelcache.json,...}   ... or a folder whose modelcache.json has "files"

A folder artifact is one candidate: its fingerprint covers every entry under
it, hidden ones included, so it settles only when the whole folder has.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.reader import MAX_JSON_FILE_BYTES, read_placed_json

FAILED_DIR = ".failed"
FOLDER_METADATA = "modelcache.json"
SIDECAR_SUFFIX = ".json"
_IGNORED_SUFFIXES = (".partial", ".tmp")
# what tools write while a file is on its way: a folder holding one is not complete yet
_IN_PROGRESS_SUFFIXES = (".partial", ".tmp", ".incomplete", ".crdownload", ".part")
_RSYNC_TEMP = re.compile(r"\..+\.[A-Za-z0-9]{6}")
# llama.cpp's gguf-split and Hugging Face's sharded checkpoints
_SHARD = re.compile(r".*-\d{5}-of-\d{5}\.(safetensors|gguf)")

Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class Candidate:
    """A file or folder in the import folder that may become one artifact."""

    path: Path
    kind: str  # "file", "folder", or "reject" (cannot be imported: reason says why)
    fingerprint: Fingerprint  # (path, inode, size, mtime_ns) of every entry whose change resets the settle
    files: tuple[Path, ...] = ()  # the files a writer could still hold open (for the /proc check)
    sidecar: Path | None = None  # <file>.json
    waiting: str | None = None  # why it cannot be imported yet, though it settled
    reason: str | None = None  # for kind "reject"


def scan(import_dir: Path) -> list[Candidate]:
    """Every candidate under ``import_dir``, in a stable order."""
    found: list[Candidate] = []
    _scan_dir(import_dir, import_dir, found)
    return found


def _scan_dir(root: Path, folder: Path, found: list[Candidate]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return  # removed while we looked
    names = {e.name: e for e in entries}
    if folder != root and _is_folder_artifact(folder, names):
        found.append(_folder_candidate(folder))
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
            continue
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            found.append(_reject(path, st, "a symbolic link: links are not followed; move or copy the file itself"))
        elif stat.S_ISDIR(st.st_mode):
            _scan_dir(root, path, found)
        elif not stat.S_ISREG(st.st_mode):
            found.append(_reject(path, st, "not a regular file"))
        elif name.endswith(SIDECAR_SUFFIX):
            if name != FOLDER_METADATA and name[: -len(SIDECAR_SUFFIX)] not in names:
                found.append(Candidate(path, "file", _prints([(path, st)]), (path,), waiting=(
                    "a JSON file is read only as the sidecar of the file it is named after "
                    f"({name[: -len(SIDECAR_SUFFIX)]}), or as modelcache.json; it is not imported by itself")))
        else:
            found.append(_file_candidate(root, folder, path, st, names))


def _file_candidate(root: Path, folder: Path, path: Path, st: os.stat_result, names: dict) -> Candidate:
    members = [(path, st)]
    sidecar = None
    for meta in (path.name + SIDECAR_SUFFIX, FOLDER_METADATA):
        entry = names.get(meta)
        if entry is not None:
            try:
                members.append((Path(entry.path), entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
            if meta != FOLDER_METADATA:
                sidecar = Path(entry.path)
    waiting = None
    if path.name.endswith(".safetensors"):
        if _SHARD.fullmatch(path.name) or any(n.endswith(".safetensors.index.json") for n in names):
            waiting = ("a shard of a sharded checkpoint: it is imported with its folder, once the folder "
                       "also holds config.json (or a modelcache.json naming the files)")
        elif folder != root:
            # a snapshot's config.json may still be on its way: settle on the whole folder
            members.extend(_entry_stats(names))
    elif _SHARD.fullmatch(path.name):
        waiting = ("a part of a split GGUF: it is imported with its folder, once the folder holds a "
                   "modelcache.json naming the parts")
    files = tuple(sorted({p for p, st in members if stat.S_ISREG(st.st_mode)}))
    return Candidate(path, "file", _prints(members), files, sidecar=sidecar, waiting=waiting)


def _is_folder_artifact(folder: Path, names: dict) -> bool:
    if FOLDER_METADATA in names:
        try:
            doc = _load_json(folder / FOLDER_METADATA)
        except (OSError, ValueError, UnicodeDecodeError):
            return True  # unreadable: planning the folder reports it, once it has settled
        if isinstance(doc, dict) and "files" in doc:
            return True
    return "config.json" in names and any(n.endswith(".safetensors") and not n.startswith(".") for n in names)


def _folder_candidate(folder: Path) -> Candidate:
    members: list[tuple[Path, os.stat_result]] = []
    in_progress: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            path = Path(dirpath, name)
            try:
                members.append((path, path.lstat()))
            except FileNotFoundError:
                continue
            if name.endswith(_IN_PROGRESS_SUFFIXES) or (name.startswith(".") and _RSYNC_TEMP.fullmatch(name)):
                in_progress.append(path.relative_to(folder).as_posix())
    waiting = None
    if in_progress:
        waiting = f"{in_progress[0]} is still being written into the folder"
    else:
        waiting = _missing_named_files(folder)
    files = tuple(p for p, st in members if stat.S_ISREG(st.st_mode))
    return Candidate(folder, "folder", _prints(members), files, waiting=waiting)


def _missing_named_files(folder: Path) -> str | None:
    """The first file that modelcache.json or a safetensors index names and that is not there yet."""
    named: list[tuple[str, str]] = []
    try:
        doc = _load_json(folder / FOLDER_METADATA)
        if isinstance(doc, dict) and isinstance(doc.get("files"), list):
            named += [(str(f), FOLDER_METADATA) for f in doc["files"] if isinstance(f, str)]
    except (OSError, ValueError, UnicodeDecodeError):
        pass  # absent, or reported when the folder is planned
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = _load_json(index).get("weight_map", {})
            named += [(str(s), index.name) for s in set(weight_map.values())]
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            continue  # reported by the header check when the folder is imported
    for name, by in sorted(named):
        if ".." not in Path(name).parts and not (folder / name).is_file():
            return f"waiting for {name}, named in {by}"
    return None


def _entry_stats(names: dict) -> list[tuple[Path, os.stat_result]]:
    found = []
    for entry in names.values():
        try:
            found.append((Path(entry.path), entry.stat(follow_symlinks=False)))
        except FileNotFoundError:
            continue
    return found


def _reject(path: Path, st: os.stat_result, reason: str) -> Candidate:
    return Candidate(path, "reject", _prints([(path, st)]), reason=reason)


def _prints(members: list[tuple[Path, os.stat_result]]) -> Fingerprint:
    return tuple(sorted({(str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p, st in members}))


def _load_json(path: Path) -> Any:
    """A JSON file of the import folder, a regular one within the bounds of every JSON value from outside
    (ValueError if not: a FIFO named modelcache.json held up every scan)."""
    return read_placed_json(path, MAX_JSON_FILE_BYTES)
