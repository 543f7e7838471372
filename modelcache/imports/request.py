"""What an import is asked to do (:class:`ImportRequest`) and what it did (:class:`ImportResult`)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..digest import Digest
from ..errors import InvalidInput
from ..formats import parse_artifact_type
from ..names import parse_model_name, parse_vendor, parse_version
from ..store import Blob


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
    # the artifact's .ollama/ blobs made for /v2 at registration (manifests.derive)
    derived: tuple[str, ...] = ()

    @property
    def blob_digests(self) -> list[str]:
        """Every blob the import left servable: its files, its folder manifest and its derived ones."""
        found = [str(b.digest) for b in self.files] + [str(self.digest), *self.derived]
        return list(dict.fromkeys(found))

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0


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
