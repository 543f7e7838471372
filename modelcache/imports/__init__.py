"""The import road, in two steps every arrival takes: ingest, then register.

- :mod:`.ingest` puts bytes into the store (from a file, a folder, a stream or an
  Ollama models directory), hashing while it copies, and says what it stored;
- :mod:`.register` records that in the registry in one transaction, audits it,
  makes the artifact's ``/v2`` manifests, removes a moved source and enforces
  the eviction policy.

``modelcache import``, the import folder (:mod:`modelcache.syncd`), uploads
(``POST /v1/imports``) and the Ollama-directory import call the compositions
below; a caller with its own stream of bytes (a download) calls
:func:`ingest_stream` with the expected digest, then :func:`register`, inside
:func:`failures_audited`. None of it knows the CLI; blocking work runs in
threads, and no database connection is held while bytes are hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Sequence

from ..auth import Subject
from ..db.pool import Database
from ..digest import Digest
from ..formats import FolderFile
from ..formats.ollama import DEFAULT_NAMESPACE, ModelName, ModelsDir
from ..store import BlobStore
from .ingest import Ingested, Progress, ingest_ollama, ingest_path, ingest_stream
from .register import failures_audited, register
from .request import ImportRequest, ImportResult, parse_description, parse_json_object

__all__ = [
    "ImportRequest", "ImportResult", "Ingested", "Progress", "failures_audited", "import_ollama_model",
    "import_path", "import_stream", "ingest_ollama", "ingest_path", "ingest_stream", "parse_description",
    "parse_json_object", "register",
]


async def import_path(db: Database, store: BlobStore, req: ImportRequest, subject: Subject, *,
                      files: Sequence[FolderFile] | None = None, progress: Progress | None = None) -> ImportResult:
    """Import ``req.path`` (a file, or a folder for a multi-file artifact) and register it.

    Audited either way; on failure nothing is registered and the user's files
    are where they were. ``files``: the folder's listing, when the caller made it.
    """
    async with failures_audited(db, req, subject):
        ingested = await ingest_path(db, store, req, files=files, progress=progress)
        return await register(db, store, req, ingested, subject)


async def import_stream(db: Database, store: BlobStore, req: ImportRequest, chunks: AsyncIterator[bytes],
                        subject: Subject, expected: Digest | None = None, *, total: int | None = None,
                        progress: Progress | None = None) -> ImportResult:
    """Import one file from a stream (an HTTP upload), hashing while it is written to ``tmp/``.

    Never holds the body in memory; with ``expected``, a mismatch keeps nothing.
    ``req.path`` only names the upload.
    """
    async with failures_audited(db, req, subject):
        ingested = await ingest_stream(db, store, req, chunks, expected=expected, total=total, progress=progress)
        return await register(db, store, req, ingested, subject)


async def import_ollama_model(db: Database, store: BlobStore, models_dir: Path, name: ModelName, subject: Subject,
                              *, model: str | None = None, version: str | None = None,
                              vendor: str | None = None, progress: Progress | None = None) -> ImportResult:
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
    async with failures_audited(db, req, subject):
        ingested = await ingest_ollama(db, store, folder, name, progress=progress)
        return await register(db, store, req, ingested, subject)
