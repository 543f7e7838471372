"""Which manifest a ``/v2/`` repository and tag (or digest) names, and the blobs made for it.

A repository ``<namespace>/<model>`` is a registry model (namespace = vendor,
``library`` for none; matched ignoring case, since OCI names are lower case);
a tag is a version. Of a version's artifacts, an ``ollama`` one is preferred
(its manifest is served byte for byte), then a ``gguf`` one, for which an
Ollama model is synthesised (``ollama.synthesise``).

Each manifest has two representations: the Docker v2 manifest Ollama asks
for, and the same descriptors as an OCI image manifest, for clients that ask
for OCI explicitly (skopeo, oras, containerd: containers/image refuses Docker
v2 manifests whose layers are not Docker layer types, while OCI manifests may
carry any layer type).

Made blobs (the OCI form of an Ollama manifest; for GGUF artifacts both
manifests, the config, template, params and license) are committed to the
store and listed as the artifact's ``.ollama/...`` files when the manifest is
first asked for, and again whenever the registry facts they come from change.
So they are verified blobs like any other: served by digest from the
in-memory catalog under the artifact's promotion state, kept across
restarts, evicted with their artifact.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from ...auth import Subject
from ...db import oci as queries
from ...digest import Digest
from ...errors import Forbidden, ImportRejected, InvalidInput, ModelcacheError, NotFound
from ...formats import DOCKER_MANIFEST_V2
from ...metadata import gguf_capabilities, read_gguf_header
from ...formats.ollama import MAX_MANIFEST_BYTES, MODEL, OCI_MANIFEST, Descriptor, Manifest, SmallBlob, synthesise
from ...store import Blob, BlobStore
from ..catalog import BlobEntry
from ..keys import CATALOG, DATABASE, STORE

logger = logging.getLogger(__name__)

MANIFEST_TYPES = queries.MANIFEST_TYPES  # in the order of preference when the client names neither
DOCKER_PATH = ".ollama/docker-manifest.json"
OCI_PATH = ".ollama/oci-manifest.json"

# The OCI distribution grammar (distribution-spec, "Pulling manifests").
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
MAX_NAME = 255


class NameInvalid(InvalidInput):
    code = "NAME_INVALID"


class NameUnknown(NotFound):
    code = "NAME_UNKNOWN"


class ManifestUnknown(NotFound):
    code = "MANIFEST_UNKNOWN"


@dataclass(frozen=True, slots=True)
class Repository:
    namespace: str
    model: str

    @classmethod
    def parse(cls, name: str) -> "Repository":
        """A repository name per the OCI grammar, of the two parts modelcache has: namespace and model."""
        shown = name if len(name) <= 100 else f"{name[:100]}..."
        if len(name) > MAX_NAME or not _NAME.fullmatch(name):
            raise NameInvalid(f"invalid repository name {shown!r}: expected lower-case components "
                              "[a-z0-9]+ joined by . _ __ or -, separated by /, at most 255 characters")
        parts = name.split("/")
        if len(parts) != 2:
            raise NameUnknown(f"no repository {shown}: repositories are <namespace>/<model>, where the namespace "
                              "is the model's vendor, or library when it has none")
        return cls(parts[0], parts[1])

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}"


def repository_name(name: str, vendor: str | None) -> str | None:
    """The repository a registry model is served as, or None if its name does not fit the OCI grammar."""
    text = f"{(vendor or 'library').lower()}/{name.lower()}"
    return text if len(text) <= MAX_NAME and _NAME.fullmatch(text) else None


def is_tag(text: str) -> bool:
    return bool(_TAG.fullmatch(text))


@dataclass(frozen=True, slots=True)
class ServedManifest:
    media_type: str
    data: bytes
    digest: Digest


# -- resolving ------------------------------------------------------------------------


async def by_tag(app: web.Application, repo: Repository, tag: str, subject: Subject,
                 choose: Callable[[list[str]], str | None]) -> ServedManifest:
    """The manifest ``repo:tag`` names, in the representation ``choose`` picks from those there are."""
    async with app[DATABASE].connection() as conn:
        model = await _model(conn, repo)
        rows = await queries.version_artifacts(conn, model["id"], tag)
    artifact = _pick(rows, subject, f"{repo}:{tag}")
    media_type = choose(MANIFEST_TYPES)
    if media_type is None:
        raise ManifestUnknown(f"the manifest of {repo}:{tag} is {DOCKER_MANIFEST_V2} or {OCI_MANIFEST}, and the "
                              "Accept header allows neither")
    views = await _current_views(app, artifact)
    data = views[media_type]
    return ServedManifest(media_type, data, Digest.from_hex(hashlib.sha256(data).hexdigest()))


async def by_digest(app: web.Application, repo: Repository, digest: Digest, subject: Subject,
                    choose: Callable[[list[str]], str | None]) -> ServedManifest:
    """The manifest of ``digest`` in ``repo``: the exact bytes stored under that digest."""
    async with app[DATABASE].connection() as conn:
        model = await _model(conn, repo)
        rows = await queries.manifest_artifacts(conn, model["id"], digest)
    artifact = _pick(rows, subject, f"{repo}@{digest}")
    media_type = artifact["media_type"]
    if choose([media_type]) is None:
        raise ManifestUnknown(f"manifest {digest} is {media_type}, which the Accept header does not allow")
    data = await asyncio.to_thread(_read_manifest, app[STORE], digest)
    return ServedManifest(media_type, data, digest)


async def tags(app: web.Application, repo: Repository, subject: Subject) -> list[str]:
    """The repository's tags this subject may pull, sorted; NameUnknown if it has none."""
    async with app[DATABASE].connection() as conn:
        model = await _model(conn, repo)
        versions = await queries.tags(conn, model["id"], _states(subject))
    found = sorted(v for v in versions if is_tag(v))
    if not found:
        raise NameUnknown(f"no repository {repo}: the model has no Ollama or GGUF artifact you may pull")
    return found


async def repositories(app: web.Application, subject: Subject) -> list[str]:
    async with app[DATABASE].connection() as conn:
        rows = await queries.repositories(conn, _states(subject))
    return sorted({name for r in rows if (name := repository_name(r["name"], r["vendor"])) is not None})


async def _model(conn, repo: Repository) -> dict:
    models = await queries.repository_models(conn, repo.namespace, repo.model)
    if not models:
        raise NameUnknown(f"no repository {repo}: no model {repo.model!r} of vendor {repo.namespace!r}"
                          + (" (or without vendor)" if repo.namespace == "library" else ""))
    if len(models) > 1:
        names = ", ".join(f"{m['vendor'] or '(no vendor)'}/{m['name']}" for m in models)
        raise NameUnknown(f"repository {repo} is ambiguous: it matches the models {names}, whose names differ "
                          "only in case; rename one of them")
    return models[0]


def _states(subject: Subject) -> list[str]:
    return ["promoted", "staged"] if subject.role is not None and subject.role.sees_staged else ["promoted"]


def _pick(rows: list[dict], subject: Subject, what: str) -> dict:
    """The artifact to serve: ollama before gguf, promoted before staged, newest first."""
    allowed = _states(subject)
    candidates = [r for r in rows if r["state"] in allowed]
    if not candidates:
        if any(r["state"] == "staged" for r in rows):
            raise Forbidden(f"{what} is staged, not promoted: only admins and operators may read it")
        states = sorted({r["state"] for r in rows})
        raise ManifestUnknown(f"no manifest {what}" + (f": its artifact is {', '.join(states)}" if states else ""))
    return min(candidates, key=lambda r: (r["artifact_type"] != "ollama", r["state"] != "promoted"))


# -- the manifests and the blobs made for them ------------------------------------------------


async def _current_views(app: web.Application, artifact: dict) -> dict[str, bytes]:
    """Both representations of the artifact's manifest, its made blobs committed and registered."""
    store: BlobStore = app[STORE]
    async with app[DATABASE].connection() as conn:
        files = await queries.artifact_files(conn, artifact["id"])
    if artifact["artifact_type"] == "ollama":
        docker = await asyncio.to_thread(_read_manifest, store, Digest.from_hex(artifact["sha256"]))
        try:
            manifest = Manifest.parse(docker, f"manifest sha256:{artifact['sha256']}")
        except ImportRejected as exc:
            raise ManifestUnknown(f"artifact {artifact['id']} holds no usable manifest: {exc.detail}") from None
        oci = manifest.encode(OCI_MANIFEST)
        made = [SmallBlob(OCI_PATH, OCI_MANIFEST, oci)]
    else:
        models = _model_layers(artifact, files)
        header = await asyncio.to_thread(_header_capabilities, store, models[0].digest)
        capabilities = {**header, **(artifact["capabilities"] or {})}
        synthesised = synthesise(models, capabilities, artifact["default_parameters"])
        docker = synthesised.manifest.encode(DOCKER_MANIFEST_V2)
        oci = synthesised.manifest.encode(OCI_MANIFEST)
        made = [SmallBlob(DOCKER_PATH, DOCKER_MANIFEST_V2, docker), SmallBlob(OCI_PATH, OCI_MANIFEST, oci),
                *synthesised.blobs]
    await _materialise(app, artifact, files, made)
    return {DOCKER_MANIFEST_V2: docker, OCI_MANIFEST: oci}


def _model_layers(artifact: dict, files: list[dict]) -> list[Descriptor]:
    """The GGUF file(s) of a gguf artifact: those typed as Ollama model layers, or its one file."""
    own = [f for f in files if not f["path"].startswith(queries.SYNTHESISED_PREFIX)]
    models = [f for f in own if f["media_type"] == MODEL] or (own if len(own) == 1 else [])
    if not models:
        raise ManifestUnknown(f"artifact {artifact['id']} (gguf) holds no GGUF file to serve as an Ollama model")
    return [Descriptor(MODEL, Digest.parse(f["blob_digest"]), f["size_bytes"]) for f in models]


async def _materialise(app: web.Application, artifact: dict, files: list[dict], made: list[SmallBlob]) -> None:
    """Make the artifact's ``.ollama/`` files exactly ``made``; nothing is written when they already are."""
    catalog = app[CATALOG]
    listed = {f["path"]: f["blob_digest"] for f in files if f["path"].startswith(queries.SYNTHESISED_PREFIX)}
    wanted = {b.path: str(b.descriptor.digest) for b in made}
    if listed == wanted and all(_present(catalog.blob(Digest.parse(d))) for d in wanted.values()):
        return
    blobs = await asyncio.to_thread(_commit_all, app[STORE], made)
    pairs = list(zip(made, blobs, strict=True))
    async with app[DATABASE].transaction() as conn:
        state = await queries.lock_servable_artifact(conn, artifact["id"])
        if state not in ("promoted", "staged"):
            raise ManifestUnknown(f"artifact {artifact['id']} is {state or 'gone'}")
        changed = await queries.save_synthesised(conn, artifact["id"],
                                                 [(b.path, blob, b.media_type) for b, blob in pairs])
    # The catalog hears of these rows by notification, but a client asks for the config right
    # after the manifest: tell it now (the notification then brings the registry's own view).
    await catalog.refresh([str(blob.digest) for blob in blobs])
    if changed:
        logger.info("made the Ollama manifest of artifact %s (%s, sha256:%s): %s", artifact["id"],
                    artifact["artifact_type"], artifact["sha256"],
                    ", ".join(f"{b.path} {blob.digest}" for b, blob in pairs))


def _present(entry: BlobEntry | None) -> bool:
    return entry is not None and entry.state == "present"


def _commit_all(store: BlobStore, made: list[SmallBlob]) -> list[Blob]:
    blobs = []
    for b in made:
        with store.temp() as temp:
            temp.write(b.data)
            temp.finish()
            blobs.append(store.commit(temp))
    return blobs


def _read_manifest(store: BlobStore, digest: Digest) -> bytes:
    try:
        with open(store.path_for(digest), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        logger.error("manifest %s is registered but missing on disk at %s", digest, store.path_for(digest))
        raise ManifestUnknown(f"manifest {digest} is missing on disk") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestUnknown(f"blob {digest} is larger than any manifest ({MAX_MANIFEST_BYTES} bytes)")
    return data


def _header_capabilities(store: BlobStore, digest: Digest) -> dict[str, Any]:
    path = store.path_for(digest)
    try:
        return dict(_cached_header_capabilities(path))
    except OSError as exc:
        logger.warning("cannot read the GGUF header of blob %s at %s for its Ollama config: %s", digest, path, exc)
        return {}


@functools.lru_cache(maxsize=256)
def _cached_header_capabilities(path: Path) -> tuple[tuple[str, Any], ...]:
    """What a stored GGUF's header tells (architecture, size, quantization); cached, as blobs never change."""
    try:
        return tuple(gguf_capabilities(read_gguf_header(path)).items())
    except ModelcacheError as exc:  # a malformed header stays malformed: remembered as telling nothing
        logger.warning("the GGUF header of %s tells nothing for its Ollama config: %s", path, exc.detail)
        return ()
