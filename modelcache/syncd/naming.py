"""Where an imported artifact's names come from, and the one request built from them (blocking).

In rising precedence, per field:

1. the file name: ``import/<file>`` is model ``<file name less its extension>``, version ``latest``;
2. the folder convention: ``import/<model>/<file>`` (version = file name less extension),
   ``import/<model>/<version>/<file>``, ``import/<vendor>/<model>/<version>/<file>``; a folder
   artifact is named the same way by its own path (``import/<model>/<version>/`` and so on);
3. ``modelcache.json`` in the file's folder (or in the folder artifact);
4. the sidecar ``<file>.json`` beside the file.

Names are parsed, never repaired: a folder or file name that is not a valid
model name or version fails the import, and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..formats import FolderFile, folder_files, load_json_object
from ..formats.folder import is_hidden
from ..imports import ImportRequest
from .scan import FOLDER_METADATA, Candidate

DEFAULT_VERSION = "latest"
SIDECAR_KEYS = ("name", "vendor", "version", "artifact_type", "capabilities", "default_parameters", "description")
FOLDER_KEYS = (*SIDECAR_KEYS, "files")
_MAX_SIDECAR_BYTES = 1 << 20


@dataclass(frozen=True)
class ImportPlan:
    request: ImportRequest
    files: tuple[FolderFile, ...] | None  # a folder artifact's files, listed once and passed to the import
    metadata: tuple[Path, ...]  # sidecar / modelcache.json consumed by this import


def plan_import(import_dir: Path, candidate: Candidate) -> ImportPlan:
    """The import request for a settled candidate; InvalidInput when a name or a sidecar is wrong."""
    path = candidate.path
    rel = path.relative_to(import_dir)
    folder = candidate.kind == "folder"
    values: dict[str, Any] = _convention(rel, folder)
    metadata: list[Path] = []
    exclude: tuple[str, ...] = ()

    folder_meta = (path if folder else path.parent) / FOLDER_METADATA
    if folder_meta.is_file():
        doc = read_sidecar(folder_meta, FOLDER_KEYS if folder else SIDECAR_KEYS)
        if folder:
            metadata.append(folder_meta)
            exclude = (FOLDER_METADATA,)
        values.update(doc)
    if candidate.sidecar is not None and candidate.sidecar.is_file():
        values.update(read_sidecar(candidate.sidecar, SIDECAR_KEYS))
        metadata.append(candidate.sidecar)

    files = None
    if folder:
        files = tuple(folder_files(path, exclude))
        if "files" in values:
            _check_named_files(path, values.pop("files"), files)
    try:
        request = ImportRequest.parse(
            path, values.get("name"), values.get("version"), values.get("vendor"), values.get("artifact_type"),
            move=True, capabilities=values.get("capabilities"), default_parameters=values.get("default_parameters"),
            description=values.get("description"), inspect=True, exclude=exclude,
        )
    except InvalidInput as exc:
        given = "sidecar" if metadata else "folder convention"
        raise InvalidInput(f"{rel}: {exc.detail} (names from the {given}; see the sidecar "
                           f"{path.name}.json or modelcache.json to give them)") from None
    return ImportPlan(request, files, tuple(metadata))


def read_sidecar(path: Path, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A sidecar's JSON object, with only known keys (a typo is an error, not ignored)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the sidecar: {exc.strerror}") from None
    try:
        doc = load_json_object(raw, _MAX_SIDECAR_BYTES)
    except ValueError as exc:
        raise InvalidInput(f"{path}: the sidecar is {exc}") from None
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise InvalidInput(f"{path}: unknown key {unknown[0]!r} in the sidecar; known: {', '.join(allowed)}")
    for key in ("name", "vendor", "version", "artifact_type", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise InvalidInput(f"{path}: {key} must be a string, not {doc[key]!r}")
    return doc


def _convention(rel: Path, folder: bool) -> dict[str, Any]:
    dirs = rel.parts if folder else rel.parts[:-1]
    if folder:
        shapes = {1: ("name",), 2: ("name", "version"), 3: ("vendor", "name", "version")}
        keys = shapes.get(len(dirs))
        if keys is None:
            return {"name": dirs[-1], "version": DEFAULT_VERSION}
        values = dict(zip(keys, dirs))
        values.setdefault("version", DEFAULT_VERSION)
        return values
    stem = _stem(rel.name)
    if len(dirs) == 0:
        return {"name": stem, "version": DEFAULT_VERSION}
    if len(dirs) == 1:
        return {"name": dirs[0], "version": stem}
    if len(dirs) == 2:
        return {"name": dirs[0], "version": dirs[1]}
    if len(dirs) == 3:
        return {"vendor": dirs[0], "name": dirs[1], "version": dirs[2]}
    return {"name": stem, "version": DEFAULT_VERSION}  # deeper than the convention: the file name


def _stem(name: str) -> str:
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def _check_named_files(folder: Path, named: Any, files: tuple[FolderFile, ...]) -> None:
    meta = folder / FOLDER_METADATA
    if not isinstance(named, list) or not named or not all(isinstance(n, str) and n for n in named):
        raise InvalidInput(f"{meta}: files must be a non-empty list of paths relative to the folder")
    for name in named:
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or any(is_hidden(part) for part in p.parts):
            raise InvalidInput(f"{meta}: {name!r} in files is not a plain relative path inside the folder")
    present = {f.rel for f in files}
    wanted = {Path(n).as_posix() for n in named}
    if wanted - present:
        raise InvalidInput(f"{meta}: names {', '.join(sorted(wanted - present))}, which is not in the folder")
    if present - wanted:
        raise InvalidInput(f"{meta}: the folder also holds {', '.join(sorted(present - wanted))}, which files "
                           "does not name; list every file of the artifact, or move the others out")
