"""What a file or folder holds: artifact types, read from content (blocking).

One module per format: :mod:`.gguf`, :mod:`.safetensors`, :mod:`.hf_snapshot`
(a folder of safetensors shards with its config) and :mod:`.ollama` (a Docker
v2 manifest and its blobs, as Ollama keeps them). :mod:`.folder` holds the one
rule for which files make up a folder artifact; :mod:`.reader` the bounded
reads every parser uses. Here: sniffing a file's type, detecting a folder's,
and reading the capabilities of either.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Sequence

from ..errors import ImportRejected, InvalidInput
from .folder import FolderFile, folder_files
from .gguf import GGUF_MAGIC, gguf_capabilities, gguf_folder_capabilities, read_gguf_header
from .hf_snapshot import snapshot_capabilities
from .reader import load_json_object
from .safetensors import MAX_HEADER_BYTES as _SAFETENSORS_MAX_HEADER
from .safetensors import read_safetensors_header, safetensors_capabilities

__all__ = [
    "ARTIFACT_TYPES", "DOCKER_MANIFEST_V2", "FolderFile", "detect_type", "folder_files", "inspect_content",
    "load_json_object", "parse_artifact_type", "read_capabilities", "sniff_file",
]

ARTIFACT_TYPES = ("gguf", "safetensors", "ollama")
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


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
                doc = load_json_object(f.read(), 1 << 20)
            except ValueError:
                return None
            if isinstance(doc, dict) and doc.get("mediaType") == DOCKER_MANIFEST_V2:
                return "ollama"
    return None


def detect_type(path: Path, files: Sequence[FolderFile] | None = None) -> str:
    """The artifact type of a file, or of a folder from its ``files`` (listed when not given).

    ImportRejected names the path when the content does not tell.
    """
    if files is not None or path.is_dir():
        names = [f.rel for f in (files if files is not None else folder_files(path))]
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


def read_capabilities(path: Path, artifact_type: str, files: Sequence[FolderFile] | None = None) -> dict[str, Any]:
    """Capabilities read from a file's header, or from every header (and config.json) of a folder.

    A folder's ``files`` are listed by :func:`folder_files` when not given.
    Raises ImportRejected when a header is truncated or malformed.
    """
    if files is None and not path.is_dir():
        if artifact_type == "gguf":
            return gguf_capabilities(read_gguf_header(path))
        if artifact_type == "safetensors":
            return safetensors_capabilities([read_safetensors_header(path)])
        return {}
    listed = files if files is not None else folder_files(path)
    if artifact_type == "gguf":
        return gguf_folder_capabilities([read_gguf_header(f.path) for f in listed if f.rel.endswith(".gguf")])
    if artifact_type == "safetensors":
        return snapshot_capabilities(listed)
    return {}


def inspect_content(path: Path, declared: str | None = None, files: Sequence[FolderFile] | None = None,
                    shown: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The one content check of every import (the CLI, the import folder, uploads): the artifact type
    and the capabilities its headers tell.

    The type is read from the content; a ``declared`` type the content contradicts, a type the
    content does not tell, or a truncated or malformed header raises ImportRejected saying what was
    found. ``shown`` names the content in those messages when ``path`` is not the name the user knows
    (an upload checked in ``tmp/``).
    """
    try:
        artifact_type = _declared_type(path, declared, files) if declared else detect_type(path, files)
        return artifact_type, read_capabilities(path, artifact_type, files)
    except ImportRejected as exc:
        if shown is None or str(shown) == str(path):
            raise
        raise ImportRejected(exc.detail.replace(str(path), str(shown))) from None


_FOUND = {"gguf": "a GGUF file", "safetensors": "a safetensors file", "ollama": "a Docker v2 manifest (ollama)"}


def _declared_type(path: Path, declared: str, files: Sequence[FolderFile] | None) -> str:
    """``declared``, unless the content says otherwise."""
    if files is not None or path.is_dir():
        names = [f.rel for f in (files if files is not None else folder_files(path))]
        if declared == "ollama" or not any(name.endswith(f".{declared}") for name in names):
            raise ImportRejected(f"{path}: declared {declared}, but the folder holds no .{declared} file "
                                 f"({len(names)} files)")
        return declared
    found = sniff_file(path)
    if found != declared:
        if found is None:
            with open(path, "rb") as f:
                head = f.read(8)
            what = f"none of GGUF, safetensors or a Docker v2 manifest (it begins with {head.hex() or 'nothing'})"
        else:
            what = _FOUND[found]
        raise ImportRejected(f"{path}: declared {declared}, but the content is {what}")
    return declared
