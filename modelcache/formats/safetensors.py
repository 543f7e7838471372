"""safetensors files (Hugging Face's format): the JSON header read strictly, and what it tells (blocking).

Only the header is read, never tensor data; every tensor's extent is checked
against the file's size, so a truncated file is refused at import, naming the
file and the tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import ImportRejected
from .reader import HeaderReader, load_json_object

# the format's own limit on the JSON header
MAX_HEADER_BYTES = 100_000_000

# safetensors dtypes -> bits per element
SAFETENSORS_DTYPES = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse a safetensors file's JSON header and check every tensor's extent against the file size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = HeaderReader(f, path, size, "safetensors")
        header_len = r.u64("header length")
        if header_len > MAX_HEADER_BYTES:
            raise r.fail(f"header length {header_len} is above the format's limit of {MAX_HEADER_BYTES}")
        raw = r.read(header_len, "JSON header")
    try:
        doc = load_json_object(raw, MAX_HEADER_BYTES)
    except ValueError as exc:
        raise ImportRejected(f"{path}: malformed safetensors header: {exc}") from None
    data_len = size - 8 - header_len
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ImportRejected(f"{path}: malformed safetensors header: __metadata__ must map strings to strings")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in doc.items():
        tensors[name] = _safetensors_tensor(path, name, info, data_len)
    return SafetensorsHeader(tensors, metadata)


def _safetensors_tensor(path: Path, name: str, info: Any, data_len: int) -> tuple[str, tuple[int, ...]]:
    def bad(message: str) -> ImportRejected:
        return ImportRejected(f"{path}: malformed safetensors header: tensor {name!r}: {message}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_len:
        raise ImportRejected(
            f"{path}: truncated safetensors file: tensor {name!r} ends at data byte {offsets[1]}, "
            f"the data section has {data_len} bytes"
        )
    bits = SAFETENSORS_DTYPES.get(dtype)
    if bits is not None:
        expected = -(-math.prod(shape) * bits // 8)
        if offsets[1] - offsets[0] != expected:
            raise bad(f"{offsets[1] - offsets[0]} bytes for {dtype} {shape} (expected {expected})")
    return dtype, tuple(shape)


def safetensors_capabilities(headers: Iterable[SafetensorsHeader]) -> dict[str, Any]:
    """Dtypes, tensor and parameter counts over one file or all shards of a snapshot."""
    dtypes: set[str] = set()
    tensors = params = 0
    for h in headers:
        dtypes.update(dtype for dtype, _ in h.tensors.values())
        tensors += len(h.tensors)
        params += h.parameter_count
    return {"format": "safetensors", "dtypes": sorted(dtypes), "tensor_count": tensors, "parameter_count": params}
