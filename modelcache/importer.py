"""Import a file or folder on the cache host: hash, store, register, audit.

The one import road, used by ``modelcache import`` and the sync daemon alike;
it knows nothing of the CLI. Blocking work runs in threads; no database
connection is held while bytes are hashed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Mapping

from . import eviction, preferences
from .auth import Subject
from .db import artifacts, audit, blobs, models
from .db.pool import Database
from .digest import Digest
from .errors import ChecksumError, ImportRejected, InvalidInput, ModelcacheError, NotFound, SourceChanged
from .formats import DOCKER_MANIFEST_V2, detect_type, parse_artifact_type, sniff_file
from .hashing import CHUNK
from .manifests import derive_quietly
from .metadata import read_capabilities
from .names import parse_model_name, parse_vendor, parse_version
from .formats.ollama import (DEFAULT_NAMESPACE, MAX_MANIFEST_BYTES, Descriptor, Manifest, ModelName, ModelsDir,
                     ollama_capabilities)
from .store import Blob, BlobStore

logger = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.modelcache.artifact.v1+json"


@dataclass(frozen=True)
class ImportRequest:
    path: Path
    model: str
    version: str
    vendor: str | None = None
    artifact_type: str | None = None
    move: bool = False
    source_uri: str | None = None
    # Given by the user (a sidecar, the API): merged into model_versions.capabilities and
    # default_parameters, and models.description, never overwriting a key already there.
    capabilities: Mapping[str, Any] | None = None
    default_parameters: Mapping[str, Any] | None = None
    description: str | None = None
    # Read the GGUF/safetensors headers into capabilities (under the user's keys); a truncated
    # or malformed header rejects the import.
    inspect: bool = False
    # Files of a folder (paths relative to it) that are not part of the artifact, e.g. its modelcache.json.
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, path: str | Path, model: str, version: str, vendor: str | None = None,
              artifact_type: str | None = None, move: bool = False, source_uri: str | None = None, *,
              capabilities: Any = None, default_parameters: Any = None, description: Any = None,
              inspect: bool = False, exclude: tuple[str, ...] = ()) -> "ImportRequest":
        return cls(
            path=Path(path),
            model=parse_model_name(model),
            version=parse_version(version),
            vendor=parse_vendor(vendor),
            artifact_type=parse_artifact_type(artifact_type) if artifact_type else None,
            move=move,
            source_uri=source_uri,
            capabilities=parse_json_object(capabilities, "capabilities"),
            default_parameters=parse_json_object(default_parameters, "default_parameters"),
            description=parse_description(description),
            inspect=inspect,
            exclude=tuple(exclude),
        )

    @property
    def model_label(self) -> str:
        name = f"{self.vendor}/{self.model}" if self.vendor else self.model
        return f"{name}:{self.version}"


@dataclass(frozen=True)
class ImportResult:
    artifact_id: uuid.UUID
    digest: Digest
    size: int
    artifact_type: str
    state: str
    created: bool  # False: the same bytes were already registered under this model and version
    seconds: float
    files: list[Blob] = field(default_factory=list)
    # what the headers told (with inspect), before the user's capabilities were laid over it
    content_capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0


async def import_path(db: Database, store: BlobStore, req: ImportRequest, subject: Subject) -> ImportResult:
    """Import ``req.path`` (a file, or a folder for a multi-file artifact) and register it.

    Audited either way; on failure nothing is registered and the user's files
    are where they were.
    """
    return await _audited(db, store, req, subject, _ingest_path(db, store, req))


async def import_stream(db: Database, store: BlobStore, req: ImportRequest, chunks: AsyncIterator[bytes],
                        subject: Subject, expected: Digest | None = None) -> ImportResult:
    """Import one file from a stream (an HTTP upload), hashing while it is written to ``tmp/``.

    Never holds the body in memory; with ``expected``, a mismatch keeps nothing.
    ``req.path`` only names the upload.
    """
    return await _audited(db, store, req, subject, _ingest_stream(db, store, req, chunks, expected))


@dataclass
class _Ingested:
    files: list[tuple[str, Blob]]
    manifest: Blob  # the single file's blob, or the folder manifest's
    artifact_type: str
    content_caps: dict[str, Any] = field(default_factory=dict)
    media_types: dict[str, str] = field(default_factory=dict)  # by path, where the source names them

    @property
    def size(self) -> int:
        return sum(b.size for _, b in self.files)


async def _audited(db: Database, store: BlobStore, req: ImportRequest, subject: Subject,
                   ingesting: Awaitable[_Ingested]) -> ImportResult:
    started = time.monotonic()
    try:
        ingested = await ingesting
        artifact, created = await _register(db, req, ingested, subject)
    except ModelcacheError as exc:
        where = "" if str(req.path) in exc.detail else f"{req.path}: "
        logger.warning("import failed: %s%s", where, exc.detail)
        await _audit_failure(db, req, subject, exc)
        raise
    await derive_quietly(db, store, artifact["id"])  # /v2's manifests are made here, not on a pull
    if req.move:
        await asyncio.to_thread(_remove_source, req.path, [path for path, _ in ingested.files])
    result = ImportResult(
        artifact_id=artifact["id"], digest=ingested.manifest.digest, size=ingested.size,
        artifact_type=ingested.artifact_type, state=artifact["state"], created=created,
        seconds=time.monotonic() - started, files=[b for _, b in ingested.files],
        content_capabilities=ingested.content_caps,
    )
    logger.info(
        "%s %s as %s (%s): %s, %d bytes in %.2fs (%.0f MB/s)",
        "imported" if created else "already registered", req.path, req.model_label, result.artifact_type,
        result.digest, result.size, result.seconds, result.mb_per_s,
    )
    if created:
        try:
            await eviction.enforce(db, store, keep=artifact["id"])
        except ModelcacheError as exc:  # the import itself is done; the next one enforces again
            logger.error("eviction after importing %s failed: %s", result.digest, exc.detail)
    return result


async def import_ollama_model(db: Database, store: BlobStore, models_dir: Path, name: ModelName, subject: Subject,
                              *, model: str | None = None, version: str | None = None,
                              vendor: str | None = None) -> ImportResult:
    """Import a model from an Ollama models directory (``$OLLAMA_MODELS``), for air-gapped sites.

    ``name`` is Ollama's ``[HOST/][NAMESPACE/]MODEL[:TAG]``, parsed. The manifest
    is stored byte for byte and its digest is the artifact's; every blob it
    names is copied from ``blobs/sha256-<hex>`` and must hash to its digest
    and have its size. The registry name is the model, the namespace as
    vendor (none for ``library``) and the tag as version, unless given.
    """
    folder = ModelsDir(models_dir)
    req = ImportRequest.parse(
        folder.manifest_path(name), model or name.model, version or name.tag,
        vendor if vendor is not None else (None if name.namespace == DEFAULT_NAMESPACE else name.namespace),
        "ollama", source_uri=f"ollama://{name}",
    )
    return await _audited(db, store, req, subject, _ingest_ollama(db, store, req, folder, name))


async def _ingest_ollama(db: Database, store: BlobStore, req: ImportRequest, folder: ModelsDir,
                         name: ModelName) -> _Ingested:
    path = await asyncio.to_thread(folder.find_manifest, name)
    raw = await asyncio.to_thread(_read_small, path, MAX_MANIFEST_BYTES)
    manifest = Manifest.parse(raw, str(path))
    sources = await asyncio.to_thread(_ollama_sources, folder, manifest)
    await eviction.admit(db, len(raw) + sum(d.size for d, _ in sources))
    files = await asyncio.to_thread(_ingest_ollama_files, store, raw, sources)
    media_types = {"manifest": DOCKER_MANIFEST_V2}
    media_types.update({_ollama_blob_name(d.digest): d.media_type for d, _ in sources})
    config = await asyncio.to_thread(_read_small, store.path_for(manifest.config.digest), MAX_MANIFEST_BYTES)
    return _Ingested(files, files[0][1], "ollama", content_caps=ollama_capabilities(config),
                     media_types=media_types)


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


def _ingest_ollama_files(store: BlobStore, raw: bytes,
                         sources: list[tuple[Descriptor, Path]]) -> list[tuple[str, Blob]]:
    with store.temp() as temp:
        temp.write(raw)
        temp.finish()
        files = [("manifest", store.commit(temp))]
    for d, path in sources:
        try:
            blob = store.ingest_copy(path, expected=d.digest)
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


async def _ingest_path(db: Database, store: BlobStore, req: ImportRequest) -> _Ingested:
    if not await asyncio.to_thread(req.path.exists):
        raise NotFound(f"{req.path}: no such file or folder")
    await eviction.admit(db, await asyncio.to_thread(_source_size, req))
    artifact_type = req.artifact_type or await asyncio.to_thread(detect_type, req.path)
    content_caps: dict[str, Any] = {}
    if req.inspect:
        # the headers are read before the bytes are hashed: the files must still be the
        # same ones (inode, size, mtime) once the hash is done, or the header may not be theirs
        before = await asyncio.to_thread(_fingerprints, req)
        content_caps = await asyncio.to_thread(read_capabilities, req.path, artifact_type, req.exclude)
    if await asyncio.to_thread(req.path.is_dir):
        files, manifest = await asyncio.to_thread(_ingest_folder, store, req)
    else:
        ingest = store.ingest_link if req.move else store.ingest_copy
        blob = await asyncio.to_thread(ingest, req.path)
        files, manifest = [(req.path.name, blob)], blob
    if req.inspect and await asyncio.to_thread(_fingerprints, req) != before:
        raise SourceChanged(f"{req.path}: changed between reading its header and hashing it")
    return _Ingested(files, manifest, artifact_type, content_caps)


async def _ingest_stream(db: Database, store: BlobStore, req: ImportRequest, chunks: AsyncIterator[bytes],
                         expected: Digest | None) -> _Ingested:
    await eviction.admit(db, 0)
    temp = await asyncio.to_thread(store.temp)
    try:
        pending = bytearray()
        async for chunk in chunks:
            pending += chunk
            if len(pending) >= CHUNK:  # hash and write in 1 MiB steps, off the event loop
                await asyncio.to_thread(temp.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(temp.write, bytes(pending))
        await asyncio.to_thread(temp.finish)
        artifact_type = req.artifact_type or await asyncio.to_thread(sniff_file, temp.path)
        if artifact_type is None:
            raise ImportRejected(f"{req.path}: cannot tell the artifact type (not GGUF, safetensors or a "
                                 "Docker v2 manifest); pass type")
        await eviction.admit(db, temp.hasher.size)
        blob = await asyncio.to_thread(store.commit, temp, expected)
    finally:
        await asyncio.to_thread(temp.discard)
    return _Ingested([(req.path.name, blob)], blob, artifact_type)


async def _register(db: Database, req: ImportRequest, ingested: _Ingested, subject: Subject) -> tuple[dict, bool]:
    """Record the blobs and the artifact in one transaction; the same bytes twice is a no-op."""
    files, manifest, artifact_type = ingested.files, ingested.manifest, ingested.artifact_type
    digest, size = manifest.digest, ingested.size
    auto_promote = (await preferences.effective(db))["models.import.auto_promote"]
    async with db.transaction() as conn:
        for _, blob in files:
            await blobs.record_blob(conn, blob.digest, blob.size, blob.xxh3)
        if manifest is not files[0][1]:
            await blobs.record_blob(conn, manifest.digest, manifest.size, manifest.xxh3)
        existing = await artifacts.artifact_by_sha256(conn, digest)
        if existing is not None:
            same = (existing["model_name"], existing["model_vendor"], existing["version"]) == (
                req.model, req.vendor, req.version)
            if not same:
                raise ImportRejected(
                    f"{req.path}: the same bytes ({digest}) are already artifact {existing['id']} of "
                    f"{_label(existing)}; one content has one artifact"
                )
            artifact, created, outcome = existing, False, "unchanged"
            if existing["state"] == "evicted":  # its bytes are back: it is servable again
                state = "promoted" if auto_promote else "staged"
                await artifacts.set_artifact(conn, existing["id"], str(subject), state=state)
                artifact, created, outcome = {**existing, "state": state}, True, "restored"
        else:
            model_id = await models.upsert_model(conn, req.model, req.vendor, str(subject))
            version_id = await models.upsert_version(conn, model_id, req.version)
            artifact = await artifacts.insert_artifact(
                conn,
                version_id=version_id,
                artifact_type=artifact_type,
                sha256=digest,
                size=size,
                cache_path=str(manifest.path),
                source_uri=req.source_uri or req.path.resolve().as_uri(),
                state="promoted" if auto_promote else "staged",
                by=str(subject),
            )
            for path, blob in files:
                await artifacts.insert_artifact_file(
                    conn, artifact["id"], path, blob.digest, blob.size,
                    ingested.media_types.get(path) or _media_type(path, artifact_type))
            capabilities = {**ingested.content_caps, **(req.capabilities or {})}
            if capabilities or req.default_parameters:
                await models.merge_version_metadata(conn, version_id, capabilities, req.default_parameters)
            if req.description:
                await models.describe_model(conn, model_id, req.description, str(subject))
            created, outcome = True, "created"
        await audit.audit(
            conn, subject, "model_artifact.import", "model_artifact", str(digest),
            outcome=outcome,
            details={"path": str(req.path), "model": req.model_label, "artifact_type": artifact_type,
                     "size_bytes": size, "state": artifact["state"]},
        )
    return artifact, created


def _source_size(req: ImportRequest) -> int:
    if req.path.is_dir():
        return sum(p.stat().st_size for p in _folder_files(req))
    return req.path.stat().st_size


def parse_json_object(value: Any, what: str) -> dict[str, Any] | None:
    """A JSON object with string keys (capabilities, default_parameters), or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise InvalidInput(f"invalid {what} {_shown(value)}: expected a JSON object with string keys")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"invalid {what}: not JSON ({exc})") from None
    return dict(value)


def parse_description(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 4000:
        raise InvalidInput(f"invalid description {_shown(value)}: expected a string of at most 4000 characters")
    return value or None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:100]}..."


def _fingerprints(req: ImportRequest) -> list[tuple[str, int, int, int]]:
    paths = [req.path] if not req.path.is_dir() else _folder_files(req)
    found = []
    for p in paths:
        st = p.stat()
        found.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return found


def _folder_files(req: ImportRequest) -> list[Path]:
    exclude = set(req.exclude)
    return sorted(
        p for p in req.path.rglob("*")
        if p.is_file() and not _hidden(p.relative_to(req.path))
        and p.relative_to(req.path).as_posix() not in exclude
    )


def _ingest_folder(store: BlobStore, req: ImportRequest) -> tuple[list[tuple[str, Blob]], Blob]:
    """Store every file of a folder, then a manifest naming them; the manifest's digest is the artifact's."""
    paths = _folder_files(req)
    if not paths:
        raise InvalidInput(f"{req.path}: the folder holds no files")
    ingest = store.ingest_link if req.move else store.ingest_copy
    files = [(p.relative_to(req.path).as_posix(), ingest(p)) for p in paths]
    document = {
        "media_type": MANIFEST_MEDIA_TYPE,
        "files": [{"path": path, "digest": str(b.digest), "size": b.size} for path, b in files],
    }
    with store.temp() as temp:
        temp.write(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
        temp.finish()
        manifest = store.commit(temp)
    return files, manifest


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _media_type(path: str, artifact_type: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    if artifact_type == "gguf" and path.endswith(".gguf"):
        return "application/vnd.ollama.image.model"
    return "application/octet-stream"


def _remove_source(path: Path, ingested: list[str]) -> None:
    """Remove exactly the files that were stored (a file added meanwhile stays), then empty folders."""
    if path.is_dir():
        for name in ingested:
            (path / name).unlink(missing_ok=True)
        for p in sorted(path.rglob("*"), reverse=True):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        if not any(path.iterdir()):
            path.rmdir()
    else:
        os.unlink(path)


def _label(row: dict) -> str:
    name = f"{row['model_vendor']}/{row['model_name']}" if row["model_vendor"] else row["model_name"]
    return f"{name}:{row['version']}"


async def _audit_failure(db: Database, req: ImportRequest, subject: Subject, exc: ModelcacheError) -> None:
    try:
        async with db.connection() as conn:
            await audit.audit(
                conn, subject, "model_artifact.import", "model_artifact", None,
                outcome="failed", reason=exc.detail, details={"path": str(req.path), "model": req.model_label},
            )
    except ModelcacheError as audit_exc:
        logger.error("could not audit the failed import of %s: %s", req.path, audit_exc.detail)
