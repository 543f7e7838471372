"""The Ollama/OCI manifests of ``gguf`` and ``ollama`` artifacts, made when their inputs change.

``/v2`` serves each such artifact as a manifest in two representations: the
Docker v2 manifest Ollama asks for, and the same descriptors as an OCI image
manifest, for clients that ask for OCI explicitly (skopeo, oras, containerd:
containers/image refuses Docker v2 manifests whose layers are not Docker
layer types, while OCI manifests may carry any layer type). An ``ollama``
artifact's Docker form is its own manifest file, byte for byte; a ``gguf``
artifact's is synthesised (``formats.ollama.synthesise``) from the GGUF
header and its version's capabilities and default parameters, with a config
blob and template, params and license layers.

The made blobs are committed to the store and listed as the artifact's
``.ollama/...`` files in one transaction, so they are verified blobs like any
other: served by digest from the in-memory catalog under the artifact's
promotion state, kept across restarts, evicted with their artifact.

They are made when an input changes, never while a client waits for them:
after an import registers the artifact, after a promote, after a version's
capabilities or default parameters change, and at server start for
artifacts that lack them. So a pull answers from memory
(``server/oci/index.py``) and never waits on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from .db import Database
from .db import oci as queries
from .digest import Digest
from .errors import ImportRejected, ModelcacheError, NotFound
from .formats import DOCKER_MANIFEST_V2
from .formats.ollama import MAX_MANIFEST_BYTES, MODEL, OCI_MANIFEST, Descriptor, Manifest, SmallBlob, synthesise
from .formats.gguf import gguf_capabilities, read_gguf_header
from .store import Blob, BlobStore

logger = logging.getLogger(__name__)


class NoManifest(NotFound):
    """An artifact from which no Ollama manifest can be made (no GGUF file, an unreadable manifest)."""


@dataclass(frozen=True, slots=True)
class Derived:
    """What :func:`derive` left: the artifact's made blobs (by digest) and whether any row changed."""

    artifact_id: uuid.UUID
    digests: tuple[str, ...]
    changed: bool


async def derive(db: Database, store: BlobStore, artifact_id: uuid.UUID) -> Derived | None:
    """Make the artifact's manifests and their blobs, committed and registered; None if it has none.

    Idempotent: when the registered ``.ollama/`` files already are what the
    inputs give and their blobs are present, nothing is written. Only
    servable (staged or promoted) ``gguf`` and ``ollama`` artifacts have manifests.
    """
    async with db.connection() as conn:
        artifact = await queries.oci_artifact(conn, artifact_id)
        if artifact is None or artifact["artifact_type"] not in queries.OCI_TYPES \
                or artifact["state"] not in queries.SERVABLE:
            return None
        files = await queries.artifact_files(conn, artifact_id)
    made = await asyncio.to_thread(_make, store, artifact, files)
    listed = {f["path"]: (f["blob_digest"], f["blob_state"]) for f in files
              if f["path"].startswith(queries.SYNTHESISED_PREFIX)}
    wanted = {b.path: (str(b.descriptor.digest), "present") for b in made}
    if listed == wanted:
        return Derived(artifact_id, tuple(d for d, _ in wanted.values()), False)
    blobs = await asyncio.to_thread(_commit_all, store, made)
    pairs = list(zip(made, blobs, strict=True))
    async with db.transaction() as conn:
        state = await queries.lock_servable_artifact(conn, artifact_id)
        if state not in queries.SERVABLE:  # evicted or quarantined meanwhile: it is served no more
            return None
        changed = await queries.save_synthesised(conn, artifact_id,
                                                 [(b.path, blob, b.media_type) for b, blob in pairs])
    if changed:
        logger.info("made the Ollama manifests of artifact %s (%s, sha256:%s): %s", artifact_id,
                    artifact["artifact_type"], artifact["sha256"],
                    ", ".join(f"{b.path} {blob.digest}" for b, blob in pairs))
    return Derived(artifact_id, tuple(str(blob.digest) for blob in blobs), changed)


async def derive_quietly(db: Database, store: BlobStore, artifact_id: uuid.UUID) -> Derived | None:
    """:func:`derive`, a failure logged rather than raised: for callers whose own work is done
    (an import is registered either way; the next start-up makes what is missing)."""
    try:
        return await derive(db, store, artifact_id)
    except NoManifest as exc:
        logger.warning("artifact %s is not served under /v2: %s", artifact_id, exc.detail)
        return None
    except ModelcacheError as exc:
        logger.error("could not make the Ollama manifests of artifact %s (the next start makes them): %s",
                     artifact_id, exc.detail)
        return None


async def derive_version(db: Database, store: BlobStore, version_id: uuid.UUID) -> list[Derived]:
    """Make again the manifests of a version's artifacts (its capabilities or parameters changed)."""
    async with db.connection() as conn:
        artifact_ids = await queries.version_oci_artifacts(conn, version_id)
    return [d for a in artifact_ids if (d := await derive_quietly(db, store, a)) is not None]


async def derive_missing(db: Database, store: BlobStore) -> list[Derived]:
    """Make the manifests servable artifacts lack (a database from before they were made at import):
    one query when none do."""
    async with db.connection() as conn:
        artifact_ids = await queries.artifacts_lacking_manifests(conn)
    if not artifact_ids:
        return []
    logger.info("making the Ollama manifests of %d artifacts that lack them", len(artifact_ids))
    return [d for a in artifact_ids if (d := await derive_quietly(db, store, a)) is not None]


# -- making them (blocking: reads blobs, hashes, writes) ---------------------------------------


def _make(store: BlobStore, artifact: dict, files: list[dict]) -> list[SmallBlob]:
    """The made blobs of an artifact, as the registry facts are now; deterministic."""
    if artifact["artifact_type"] == "ollama":
        digest = Digest.from_hex(artifact["sha256"])
        try:
            manifest = Manifest.parse(read_manifest(store, digest), f"manifest {digest}")
        except ImportRejected as exc:
            raise NoManifest(f"artifact {artifact['id']} holds no usable manifest: {exc.detail}") from None
        return [SmallBlob(queries.OCI_PATH, OCI_MANIFEST, manifest.encode(OCI_MANIFEST))]
    models = _model_layers(artifact, files)
    capabilities = {**_header_capabilities(store, models[0].digest), **(artifact["capabilities"] or {})}
    synthesised = synthesise(models, capabilities, artifact["default_parameters"])
    return [SmallBlob(queries.DOCKER_PATH, DOCKER_MANIFEST_V2, synthesised.manifest.encode(DOCKER_MANIFEST_V2)),
            SmallBlob(queries.OCI_PATH, OCI_MANIFEST, synthesised.manifest.encode(OCI_MANIFEST)),
            *synthesised.blobs]


def _model_layers(artifact: dict, files: list[dict]) -> list[Descriptor]:
    """The GGUF file(s) of a gguf artifact: those typed as Ollama model layers, or its one file."""
    own = [f for f in files if not f["path"].startswith(queries.SYNTHESISED_PREFIX)]
    models = [f for f in own if f["media_type"] == MODEL] or (own if len(own) == 1 else [])
    if not models:
        raise NoManifest(f"artifact {artifact['id']} (gguf) holds no GGUF file to serve as an Ollama model")
    return [Descriptor(MODEL, Digest.parse(f["blob_digest"]), f["size_bytes"]) for f in models]


def _header_capabilities(store: BlobStore, digest: Digest) -> dict[str, Any]:
    """What a stored GGUF's header tells (architecture, size, quantization), for the Ollama config.

    A file whose header cannot be read gets no manifest: Ollama would pull it
    and then fail to load it, far from the cause.
    """
    path = store.path_for(digest)
    try:
        return gguf_capabilities(read_gguf_header(path))
    except OSError as exc:
        raise NoManifest(f"cannot read the GGUF header of blob {digest} at {path}: {exc}") from None
    except ModelcacheError as exc:
        raise NoManifest(f"blob {digest} is not a GGUF Ollama can load: {exc.detail}") from None


def _commit_all(store: BlobStore, made: list[SmallBlob]) -> list[Blob]:
    blobs = []
    for b in made:
        with store.temp() as temp:
            temp.write(b.data)
            temp.finish()
            blobs.append(store.commit(temp))
    return blobs


def read_manifest(store: BlobStore, digest: Digest) -> bytes:
    """A stored manifest's bytes, checked against its digest; NoManifest if missing or not one."""
    path = store.path_for(digest)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise NoManifest(f"manifest {digest} is registered but missing on disk at {path}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise NoManifest(f"blob {digest} at {path} is larger than any manifest ({MAX_MANIFEST_BYTES} bytes)")
    if hashlib.sha256(data).hexdigest() != digest.hex:
        raise NoManifest(f"manifest {digest} at {path} does not hash to its digest")
    return data
