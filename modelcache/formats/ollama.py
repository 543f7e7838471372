"""Ollama's model format: manifests, the models directory, and manifests synthesised for GGUF files.

An Ollama model is a Docker v2 image manifest whose config blob is Ollama's
``ConfigV2`` JSON and whose layers are typed ``application/vnd.ollama.image.*``
(``model`` is the GGUF). Ollama's own models directory holds it as::

    <models>/manifests/<host>/<namespace>/<model>/<tag>   the manifest, byte for byte
    <models>/blobs/sha256-<hex>                           config and layers (older builds: sha256:<hex>)

Everything here is pure or blocking: no database, no event loop. Parsers are
strict and their errors name the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..digest import Digest
from ..errors import ImportRejected, InvalidInput, NotFound
from . import DOCKER_MANIFEST_V2, load_json_object

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
PARAMS = "application/vnd.ollama.image.params"
LICENSE = "application/vnd.ollama.image.license"

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama manifests are a few kilobytes; anything much larger is not one.
MAX_MANIFEST_BYTES = 4 << 20


# -- manifests -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One blob a manifest names: its media type, digest and size."""

    media_type: str
    digest: Digest
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, source: str) -> "Manifest":
        """A Docker v2 image manifest, strictly; ImportRejected naming ``source`` otherwise."""

        def bad(message: str) -> ImportRejected:
            return ImportRejected(f"{source}: not an Ollama manifest: {message}")

        try:
            doc = load_json_object(raw, MAX_MANIFEST_BYTES)
        except ValueError as exc:
            raise bad(str(exc)) from None
        if doc.get("schemaVersion") != 2:
            raise bad(f"schemaVersion is {doc.get('schemaVersion')!r}, expected 2")
        if doc.get("mediaType") != DOCKER_MANIFEST_V2:
            raise bad(f"mediaType is {doc.get('mediaType')!r}, expected {DOCKER_MANIFEST_V2}")
        layers = doc.get("layers")
        if not isinstance(layers, list) or not layers:
            raise bad("layers must be a non-empty list")
        return cls(_descriptor(doc.get("config"), "config", bad),
                   tuple(_descriptor(layer, f"layers[{i}]", bad) for i, layer in enumerate(layers)))

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """The config and every layer, each digest once, in manifest order."""
        seen: dict[Digest, Descriptor] = {}
        for d in (self.config, *self.layers):
            seen.setdefault(d.digest, d)
        return tuple(seen.values())

    def encode(self, media_type: str) -> bytes:
        """This manifest as JSON of ``media_type`` (Docker v2 or OCI), compact, as Ollama writes it."""
        doc = {"schemaVersion": 2, "mediaType": media_type, "config": self.config.to_json(),
               "layers": [layer.to_json() for layer in self.layers]}
        return json.dumps(doc, separators=(",", ":")).encode()


def _descriptor(value: Any, where: str, bad) -> Descriptor:
    if not isinstance(value, dict):
        raise bad(f"{where} must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise bad(f"{where}.mediaType must be a non-empty string")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad(f"{where}.size must be a non-negative integer, not {size!r}")
    try:
        parsed = Digest.parse(digest)
    except InvalidInput as exc:
        raise bad(f"{where}.digest: {exc.detail}") from None
    return Descriptor(media_type, parsed, size)


# -- manifests synthesised for GGUF artifacts --------------------------------------


@dataclass(frozen=True, slots=True)
class SmallBlob:
    """A blob made here (config, template, params, license): its bytes and where the artifact lists it."""

    path: str
    media_type: str
    data: bytes

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, Digest.from_hex(hashlib.sha256(self.data).hexdigest()), len(self.data))


@dataclass(frozen=True, slots=True)
class Synthesised:
    manifest: Manifest
    blobs: tuple[SmallBlob, ...]


def synthesise(models: list[Descriptor], capabilities: Mapping[str, Any],
               default_parameters: Mapping[str, Any] | None) -> Synthesised:
    """The Ollama model for GGUF file(s): deterministic, the same registry facts give the same bytes.

    ``capabilities`` are the version's (the GGUF header's facts under the
    user's keys). Layers: the GGUF(s) as ``model``; ``template`` when
    ``chat_template`` is a string (the text of an Ollama Go template: a header
    only tells whether the GGUF has one, as ``true``); ``license`` when
    ``license`` is a string; ``params`` from ``default_parameters``.
    """
    extra: list[SmallBlob] = []
    template = capabilities.get("chat_template")
    if isinstance(template, str) and template.strip():
        extra.append(SmallBlob(".ollama/template", TEMPLATE, template.encode()))
    license_text = capabilities.get("license")
    if isinstance(license_text, str) and license_text.strip():
        extra.append(SmallBlob(".ollama/license", LICENSE, license_text.encode()))
    if default_parameters:
        # as Ollama's json.Encoder writes a map: sorted keys, compact, a newline
        extra.append(SmallBlob(".ollama/params.json", PARAMS,
                               json.dumps(dict(default_parameters), sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False).encode() + b"\n"))
    layers = (*models, *(b.descriptor for b in extra))
    config = SmallBlob(".ollama/config.json", CONFIG, _config(layers, capabilities))
    return Synthesised(Manifest(config.descriptor, tuple(layers)), (config, *extra))


def _config(layers: tuple[Descriptor, ...], caps: Mapping[str, Any]) -> bytes:
    """Ollama's ConfigV2 (field order as Go writes it) plus the rootfs an image config carries."""
    arch = caps.get("architecture") if isinstance(caps.get("architecture"), str) else ""
    count = caps.get("parameter_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        model_type = human_number(count)
    else:
        model_type = caps.get("size_label") if isinstance(caps.get("size_label"), str) else ""
    quantization = caps.get("quantization") if isinstance(caps.get("quantization"), str) else ""
    doc = {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else None,
        "model_type": model_type,
        "file_type": quantization,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [str(layer.digest) for layer in layers]},
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def ollama_capabilities(config: bytes) -> dict[str, Any]:
    """What an Ollama config blob tells, as registry capabilities (for selection); {} if it is not one."""
    try:
        doc = load_json_object(config, MAX_MANIFEST_BYTES)
    except ValueError:
        return {}
    caps: dict[str, Any] = {}
    for key, cap in (("model_family", "architecture"), ("model_type", "size_label"), ("file_type", "quantization")):
        if isinstance(doc.get(key), str) and doc[key]:
            caps[cap] = doc[key]
    return caps


def human_number(n: int) -> str:
    """A parameter count as Ollama shows it (its format.HumanNumber): 8B, 7.2B, 137M, 1.25M, 4K."""
    if n >= 1_000_000_000:
        value = n / 1_000_000_000
        return f"{value:.0f}B" if value == int(value) else f"{value:.1f}B"
    if n >= 1_000_000:
        value = n / 1_000_000
        return f"{value:.0f}M" if value == int(value) else f"{value:.2f}M"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


# -- Ollama's models directory ---------------------------------------------------------

# Ollama's name parts (types/model/name.go): a host may carry a port; the others are plain names.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,349}(:[0-9]{1,5})?")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")


@dataclass(frozen=True, slots=True)
class ModelName:
    """``[host/][namespace/]model[:tag]``, Ollama's defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        """Parse like Ollama does (right to left); a part that could escape a folder is rejected."""
        shown = text if isinstance(text, str) and len(text) <= 200 else f"{str(text)[:200]}..."
        expected = InvalidInput(f"invalid Ollama model name {shown!r}: expected [HOST/][NAMESPACE/]MODEL[:TAG], "
                                "e.g. llama3:8b or registry.ollama.ai/library/llama3:8b")
        if not isinstance(text, str) or "://" in text:
            raise expected
        rest, tag = text, DEFAULT_TAG
        colon = text.rfind(":")
        if colon > text.rfind("/"):  # a colon before the last slash is a host's port
            rest, tag = text[:colon], text[colon + 1:]
        parts = rest.split("/")
        if len(parts) > 3:
            raise expected
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        if not (_HOST.fullmatch(host) and _PART.fullmatch(namespace) and _PART.fullmatch(model)
                and _TAG.fullmatch(tag)) or ".." in (host + namespace + model + tag):
            raise expected
        return cls(host, namespace, model, tag)

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def version_name(vendor: str | None, model: str, version: str, host: str = DEFAULT_HOST) -> ModelName:
    """The Ollama name of a model version, ``host/vendor/model:version`` (namespace and model lower-case, as
    Ollama keeps them); InvalidInput when Ollama cannot name it (a ``+`` in the version, a tag over 80)."""
    return ModelName.parse(f"{host}/{(vendor or DEFAULT_NAMESPACE).lower()}/{model.lower()}:{version}")


class ModelsDir:
    """An Ollama models directory (``$OLLAMA_MODELS``, e.g. ``~/.ollama/models``); blocking reads."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def manifest_path(self, name: ModelName) -> Path:
        return self.root / "manifests" / name.host / name.namespace / name.model / name.tag

    def blob_path(self, digest: Digest) -> Path:
        """The one place an Ollama blob path is made: ``sha256-<hex>``, or the older ``sha256:<hex>``."""
        path = self.root / "blobs" / f"sha256-{digest.hex}"
        if not path.exists():
            legacy = self.root / "blobs" / f"sha256:{digest.hex}"
            if legacy.exists():
                return legacy
        return path

    def find_manifest(self, name: ModelName) -> Path:
        """The manifest's path, or NotFound listing the models the folder does hold."""
        if not (self.root / "manifests").is_dir():
            raise NotFound(f"{self.root}: not an Ollama models directory (no manifests/ folder in it)")
        path = self.manifest_path(name)
        if path.is_file():
            return path
        held = sorted(
            f"{p.parts[-4]}/{p.parts[-3]}/{p.parts[-2]}:{p.parts[-1]}"
            for p in (self.root / "manifests").glob("*/*/*/*") if p.is_file()
        )
        hint = f"; it holds {', '.join(held[:20])}" if held else "; it holds no models"
        raise NotFound(f"no manifest for {name} at {path}{hint}")
