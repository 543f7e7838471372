"""Bytes into the store: from a file, a folder, a stream or an Ollama models directory.

Each ingest hashes while it copies (or, for a move, while it reads a hard link
in place), commits blobs through :class:`~modelcache.store.BlobStore`, and
returns what it stored as :class:`Ingested`; nothing is registered here (see
:mod:`.register`). The source is never touched: a moved file is removed by the
register step, after the registry commit. A folder is listed once, by
:func:`~modelcache.formats.folder_files`, and that listing serves type
detection, header reading, fingerprints and the ingest alike.

Progress is reported as ``progress(bytes done, bytes in all)`` after each
chunk, from the hashing thread (or the event loop, for a stream): keep it
cheap. ``bytes in all`` is None for a stream of unknown length.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from .. import eviction
from ..db.pool import Database
from ..digest import Digest
from ..errors import ChecksumError, ImportRejected, InvalidInput, NotFound, SourceChanged
from ..formats import DOCKER_MANIFEST_V2, FolderFile, detect_type, folder_files, inspect_content
from ..formats.ollama import MAX_MANIFEST_BYTES, Descriptor, Manifest, ModelName, ModelsDir, ollama_capabilities
from ..hashing import CHUNK
from ..store import Blob, BlobStore, TempBlob
from .request import ImportRequest

MANIFEST_MEDIA_TYPE = "application/vnd.modelcache.artifact.v1+json"

Progress = Callable[[int, int | None], object]


@dataclass
class Ingested:
    """What an ingest stored: the artifact's files, the blob whose digest names it, and what it is."""

    files: list[tuple[str, Blob]]
    manifest: Blob  # the single file's blob, or the folder manifest's
    artifact_type: str
    content_caps: dict[str, Any] = field(default_factory=dict)
    media_types: dict[str, str] = field(default_factory=dict)  # by path, where the source names them
    started: float = field(default_factory=time.monotonic)  # when the ingest began (monotonic)

    @property
    def size(self) -> int:
        return sum(b.size for _, b in self.files)


class _Meter:
    """Adds up the bytes hashed over every file of one ingest, for one ``progress`` callback."""

    def __init__(self, total: int | None, progress: Progress | None) -> None:
        self.total, self.progress, self.done = total, progress, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


async def ingest_path(db: Database, store: BlobStore, req: ImportRequest, *,
                      files: Sequence[FolderFile] | None = None, progress: Progress | None = None) -> Ingested:
    """Store ``req.path``, a file or a folder (every file of :func:`folder_files`, then a manifest naming them).

    ``files`` is the folder's listing when the caller made it already (the import
    folder does, to check its ``modelcache.json``). With ``req.move`` files are
    hard-linked into the store rather than copied.
    """
    started = time.monotonic()
    if not await asyncio.to_thread(req.path.exists):
        raise NotFound(f"{req.path}: no such file or folder")
    listing: Sequence[FolderFile] | None = None
    if await asyncio.to_thread(req.path.is_dir):
        listing = files if files is not None else await asyncio.to_thread(folder_files, req.path, req.exclude)
    before = await asyncio.to_thread(_fingerprints, req.path, listing)
    size = sum(size for _, _, size, _ in before)
    await eviction.admit(db, size)
    if req.inspect:
        # the headers are read before the bytes are hashed: the files must still be the
        # same ones (inode, size, mtime) once the hash is done, or the header may not be theirs
        artifact_type, content_caps = await asyncio.to_thread(inspect_content, req.path, req.artifact_type,
                                                              listing)
    else:  # a caller that vouches for the content (tests' fixtures): the declared type is taken as given
        artifact_type = req.artifact_type or await asyncio.to_thread(detect_type, req.path, listing)
        content_caps = {}
    meter = _Meter(size, progress)
    if listing is not None:
        stored, manifest = await asyncio.to_thread(_ingest_folder, store, req.path, listing, req.move, meter)
    else:
        ingest = store.ingest_link if req.move else store.ingest_copy
        blob = await asyncio.to_thread(ingest, req.path, None, meter)
        stored, manifest = [(req.path.name, blob)], blob
    if req.inspect and await asyncio.to_thread(_fingerprints, req.path, listing) != before:
        raise SourceChanged(f"{req.path}: changed between reading its header and hashing it")
    return Ingested(stored, manifest, artifact_type, content_caps, started=started)


async def ingest_stream(db: Database, store: BlobStore, req: ImportRequest, chunks: AsyncIterator[bytes], *,
                        expected: Digest | None = None, total: int | None = None,
                        progress: Progress | None = None, temp: TempBlob | None = None) -> Ingested:
    """Store one file from a stream (an upload, a download), hashing while it is written to ``tmp/``.

    Never holds the body in memory; with ``expected``, a mismatch keeps nothing
    (ChecksumError). ``total`` is the announced length, for progress only.
    ``req.path`` only names the file. ``temp``: a download's resumable partial
    file, already holding (and having hashed) the bytes before the stream's.
    The bytes come from outside, so they are always inspected as a path import with
    ``inspect`` is (:func:`~modelcache.formats.inspect_content`), in ``tmp/`` before the
    commit: a refused stream keeps nothing.
    """
    started = time.monotonic()
    await eviction.admit(db, total or 0)
    meter = _Meter(total, progress)
    temp = temp or await asyncio.to_thread(store.temp)
    try:
        pending = bytearray()
        async for chunk in chunks:
            pending += chunk
            if len(pending) >= CHUNK:  # hash and write in 1 MiB steps, off the event loop
                await asyncio.to_thread(temp.write, bytes(pending))
                meter(len(pending))
                pending.clear()
        await asyncio.to_thread(temp.write, bytes(pending))
        meter(len(pending))
        await asyncio.to_thread(temp.finish)
        if expected is not None and temp.hasher.digest != expected:  # a damaged transfer says so first
            raise ChecksumError(str(req.path), str(expected), str(temp.hasher.digest))
        artifact_type, content_caps = await asyncio.to_thread(inspect_content, temp.path, req.artifact_type,
                                                              None, req.path)
        await eviction.admit(db, temp.hasher.size)
        blob = await asyncio.to_thread(store.commit, temp, expected)
    finally:
        await asyncio.to_thread(temp.discard)
    return Ingested([(req.path.name, blob)], blob, artifact_type, content_caps, started=started)


async def ingest_ollama(db: Database, store: BlobStore, folder: ModelsDir, name: ModelName, *,
                        progress: Progress | None = None, link: bool = False) -> Ingested:
    """Store an Ollama model's manifest byte for byte and every blob it names, each checked against its digest.

    ``link``: the blobs are hard-linked into the store rather than copied (a download's staging folder,
    which is removed afterwards; never a user's models dir, whose files must stay writable by Ollama).
    """
    started = time.monotonic()
    path = await asyncio.to_thread(folder.find_manifest, name)
    raw = await asyncio.to_thread(_read_small, path, MAX_MANIFEST_BYTES)
    manifest = Manifest.parse(raw, str(path))
    sources = await asyncio.to_thread(_ollama_sources, folder, manifest)
    total = len(raw) + sum(d.size for d, _ in sources)
    await eviction.admit(db, total)
    files = await asyncio.to_thread(_ingest_ollama_files, store, raw, sources, _Meter(total, progress), link)
    media_types = {"manifest": DOCKER_MANIFEST_V2}
    media_types.update({_ollama_blob_name(d.digest): d.media_type for d, _ in sources})
    config = await asyncio.to_thread(_read_small, store.path_for(manifest.config.digest), MAX_MANIFEST_BYTES)
    return Ingested(files, files[0][1], "ollama", content_caps=ollama_capabilities(config),
                    media_types=media_types, started=started)


def _ollama_sources(folder: ModelsDir, manifest: Manifest) -> list[tuple[Descriptor, Path]]:
    """Each blob the manifest names and its file, checked for presence and size before any copy."""
    sources = []
    for d in manifest.blobs:
        path = folder.blob_path(d.digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{path}: blob {d.digest} ({d.media_type}) named by the manifest is missing") from None
        if size != d.size:
            raise ImportRejected(f"{path}: blob {d.digest} has {size} bytes, the manifest says {d.size}")
        sources.append((d, path))
    return sources


def _ingest_ollama_files(store: BlobStore, raw: bytes, sources: list[tuple[Descriptor, Path]],
                         meter: _Meter, link: bool = False) -> list[tuple[str, Blob]]:
    with store.temp() as temp:
        temp.write(raw)
        temp.finish()
        files = [("manifest", store.commit(temp))]
    meter(len(raw))
    for d, path in sources:
        try:
            blob = (store.ingest_link if link else store.ingest_copy)(path, d.digest, meter)
        except ChecksumError as exc:
            raise ChecksumError(str(path), exc.expected, exc.actual) from None
        files.append((_ollama_blob_name(d.digest), blob))
    return files


def _ollama_blob_name(digest: Digest) -> str:
    return f"blobs/sha256-{digest.hex}"


def _read_small(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ImportRejected(f"{path}: larger than {limit} bytes")
    return raw


def _fingerprints(path: Path, listing: Sequence[FolderFile] | None) -> list[tuple[str, int, int, int]]:
    """(path, inode, size, mtime) of a file, or of every file of a folder listing and of the folders holding them.

    A folder's mtime moves when a name is added to it or removed from it, so
    comparing these before and after proves the listing still holds without
    walking the folder again.
    """
    if listing is None:
        st = path.stat()
        return [(str(path), st.st_ino, st.st_size, st.st_mtime_ns)]
    found = []
    for f in listing:
        st = f.path.stat()
        found.append((str(f.path), st.st_ino, st.st_size, st.st_mtime_ns))
    folders = {path} | {path.joinpath(*parent) for f in listing for parent in _parents(f.rel)}
    for d in sorted(folders):
        st = d.stat()
        found.append((str(d), st.st_ino, 0, st.st_mtime_ns))
    return found


def _parents(rel: str) -> list[tuple[str, ...]]:
    parts = rel.split("/")[:-1]
    return [tuple(parts[:i]) for i in range(1, len(parts) + 1)]


def folder_manifest(files: Sequence[tuple[str, Digest, int]]) -> bytes:
    """A folder artifact's manifest: a function of its files' (path, digest, size) in listing order alone,
    so its digest (the artifact's) is known before any blob is committed, from digests already checked."""
    document = {
        "media_type": MANIFEST_MEDIA_TYPE,
        "files": [{"path": path, "digest": str(digest), "size": size} for path, digest, size in files],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _ingest_folder(store: BlobStore, folder: Path, listing: Sequence[FolderFile], move: bool,
                   meter: _Meter) -> tuple[list[tuple[str, Blob]], Blob]:
    """Store every file of a folder, then a manifest naming them; the manifest's digest is the artifact's."""
    if not listing:
        raise InvalidInput(f"{folder}: the folder holds no files")
    ingest = store.ingest_link if move else store.ingest_copy
    files = [(f.rel, ingest(f.path, None, meter)) for f in listing]
    with store.temp() as temp:
        temp.write(folder_manifest([(path, b.digest, b.size) for path, b in files]))
        temp.finish()
        manifest = store.commit(temp)
    return files, manifest
