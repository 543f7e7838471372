"""What kind of artifact a file holds, read from its first bytes (blocking)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import ImportRejected, InvalidInput

ARTIFACT_TYPES = ("gguf", "safetensors", "ollama")
GGUF_MAGIC = b"GGUF"
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
# safetensors headers are JSON of at most 100 MB by the format's own rule
_SAFETENSORS_MAX_HEADER = 100_000_000


def load_json_object(raw: bytes, max_bytes: int) -> dict:
    """A JSON object from bytes (a sidecar, a manifest, a header); ValueError says what is wrong."""
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def parse_artifact_type(text: str) -> str:
    if text not in ARTIFACT_TYPES:
        raise InvalidInput(f"invalid artifact type {text!r}: expected one of {', '.join(ARTIFACT_TYPES)}")
    return text


def sniff_file(path: Path) -> str | None:
    """``gguf``, ``safetensors``, ``ollama`` (a Docker v2 manifest) or None."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:4] == GGUF_MAGIC:
            return "gguf"
        if len(head) >= 9:
            (header_len,) = struct.unpack("<Q", head[:8])
            if 2 <= header_len <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
                return "safetensors"
        if head.lstrip()[:1] == b"{" and path.stat().st_size < 1 << 20:
            f.seek(0)
            try:
                doc = json.loads(f.read())
            except (ValueError, UnicodeDecodeError):
                return None
            if isinstance(doc, dict) and doc.get("mediaType") == DOCKER_MANIFEST_V2:
                return "ollama"
    return None


def detect_type(path: Path) -> str:
    """The artifact type of a file or folder, or ImportRejected naming the path."""
    if path.is_dir():
        names = [p.name for p in path.rglob("*") if p.is_file()]
        if any(name.endswith(".safetensors") for name in names):
            return "safetensors"
        if any(name.endswith(".gguf") for name in names):
            return "gguf"
        raise ImportRejected(f"{path}: cannot tell the artifact type of this folder; pass --type")
    found = sniff_file(path)
    if found is None:
        raise ImportRejected(
            f"{path}: cannot tell the artifact type (not GGUF, safetensors or a Docker v2 manifest); pass --type"
        )
    return found
