"""Which files make up a folder artifact: the one rule (blocking).

Every regular file under the folder, at any depth, except hidden ones (a name
starting with ``.`` anywhere in its path: ``.git/``, ``.cache/``, editors'
swap files, rsync's temp names) and the paths the caller excludes (a folder's
own ``modelcache.json``). Type detection, header reading, fingerprints and
ingest all take this one listing, made once per import.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterable, NamedTuple


class FolderFile(NamedTuple):
    rel: str  # the path relative to the folder, posix-style: the name it has in the artifact
    path: Path


def folder_files(folder: Path, exclude: Iterable[str] = ()) -> list[FolderFile]:
    """The files of a folder artifact, sorted as the folder manifest lists them."""
    skip = set(exclude)
    found: list[FolderFile] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    continue  # a hidden folder is not walked at all
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file():
                    rel = path.relative_to(folder).as_posix()
                    if rel not in skip:
                        found.append(FolderFile(rel, path))
    # by path components, as the manifests of artifacts already imported were ordered: their digests depend on it
    found.sort(key=lambda f: PurePosixPath(f.rel).parts)
    return found


def is_hidden(name: str) -> bool:
    return name.startswith(".")
