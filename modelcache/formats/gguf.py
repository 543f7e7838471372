"""GGUF files (llama.cpp's format): the header read strictly, and the capabilities it tells (blocking).

Only the header is read, never tensor data. The parser is our own, small and
strict, so that a header read needs no numpy: every length is checked against
the file's size before anything is allocated (:class:`.reader.HeaderReader`),
and a header that is truncated or does not follow the format raises
:class:`~modelcache.errors.ImportRejected` naming the file, the offset and what
was expected. Tests check the parser against a file written by llama.cpp's own
``gguf`` package.

:func:`gguf_capabilities` turns a header into the flat keys of
``model_versions.capabilities`` (``architecture``, ``context_length``,
``parameter_count``, ``quantization``, ``chat_template``, ...).
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImportRejected
from .reader import HeaderReader

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
# arrays longer than this are kept as their length only (tokenizer vocabularies run to 150k strings)
_KEEP_ARRAY_ITEMS = 16

# GGUF value types: type id -> struct format of a scalar (8 = string, 9 = array)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block), from ggml's type traits
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# general.file_type (llama.cpp's llama_ftype) -> the label users know
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the tensor data section

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]  # scalars, and arrays of up to 16 items
    array_lengths: dict[str, int]  # every array's length, kept or not
    tensors: list[GgufTensor]
    data_offset: int  # where the tensor data section starts in the file

    @property
    def parameter_count(self) -> int:
        return sum(t.elements for t in self.tensors)


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse a GGUF file's header (versions 2 and 3): key/values and tensor infos, checked against the file size."""
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        r = HeaderReader(f, path, size, "GGUF")
        if r.read(4, "magic") != GGUF_MAGIC:
            raise r.fail("expected the magic 'GGUF' at offset 0")
        version = r.u32("version")
        if version not in (2, 3):
            raise r.fail(f"version {version} is not supported (expected 2 or 3)")
        tensor_count = r.u64("tensor count")
        kv_count = r.u64("key/value count")
        # each key/value takes at least 13 bytes, each tensor info at least 29: a bound before any loop
        if kv_count * 13 + tensor_count * 29 > size - r.pos:
            raise ImportRejected(
                f"{path}: truncated GGUF header: {kv_count} key/values and {tensor_count} tensors "
                f"cannot fit in a file of {size} bytes"
            )
        metadata: dict[str, Any] = {}
        array_lengths: dict[str, int] = {}
        for i in range(kv_count):
            key = r.text(f"key #{i}")
            if key in metadata or key in array_lengths:
                raise r.fail(f"key {key!r} appears twice")
            value_type = r.u32(f"type of {key}")
            if value_type == _GGUF_ARRAY:
                items, length = _gguf_array(r, key, depth=0)
                array_lengths[key] = length
                if items is not None:
                    metadata[key] = items
            else:
                metadata[key] = _gguf_scalar(r, value_type, key)

        tensors = []
        for i in range(tensor_count):
            name = r.text(f"name of tensor #{i}")
            n_dims = r.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to {GGML_MAX_DIMS})")
            shape = tuple(r.u64(f"dimension of {name}") for _ in range(n_dims))
            ggml_type = r.u32(f"type of {name}")
            offset = r.u64(f"offset of {name}")
            tensors.append(GgufTensor(name, shape, ggml_type, offset))

        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment = {alignment!r} (expected a power of two)")
        data_offset = -(-r.pos // alignment) * alignment
        _check_tensor_data(path, tensors, alignment, data_offset, size)
    return GgufHeader(version, metadata, array_lengths, tensors, data_offset)


def _gguf_scalar(r: HeaderReader, value_type: int, key: str) -> Any:
    if value_type == _GGUF_STRING:
        return r.string_bytes(f"value of {key}").decode("utf-8", errors="replace")
    fmt = _GGUF_SCALARS.get(value_type)
    if fmt is None:
        raise r.fail(f"value type {value_type} of {key!r} at offset {r.pos - 4} is not a GGUF type")
    return r.unpack(fmt, f"value of {key}")


def _gguf_array(r: HeaderReader, key: str, depth: int) -> tuple[list | None, int]:
    """Read an array; its items are kept only when there are few of them."""
    item_type = r.u32(f"item type of {key}")
    length = r.u64(f"length of {key}")
    keep = length <= _KEEP_ARRAY_ITEMS
    if item_type == _GGUF_ARRAY:
        if depth >= 2:
            raise r.fail(f"arrays nested too deep in {key!r}")
        if length * 12 > r.size - r.pos:
            r.read(length * 12, f"items of {key}")  # raises the truncation error
        items = [_gguf_array(r, key, depth + 1)[0] for _ in range(length)]
        return (items if keep else None), length
    if item_type == _GGUF_STRING:
        if length * 8 > r.size - r.pos:
            r.read(length * 8, f"items of {key}")  # raises the truncation error
        if keep:
            return [r.string_bytes(f"item of {key}").decode("utf-8", errors="replace") for _ in range(length)], length
        for _ in range(length):
            r.skip(r.u64(f"length of an item of {key}"), f"item of {key}")
        return None, length
    fmt = _GGUF_SCALARS.get(item_type)
    if fmt is None:
        raise r.fail(f"item type {item_type} of {key!r} is not a GGUF type")
    width = struct.calcsize(fmt)
    if keep:
        return [r.unpack(fmt, f"item of {key}") for _ in range(length)], length
    r.skip(length * width, f"items of {key}")
    return None, length


def _check_tensor_data(path: Path, tensors: list[GgufTensor], alignment: int, data_offset: int, size: int) -> None:
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise ImportRejected(f"{path}: malformed GGUF header: tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % alignment:
            raise ImportRejected(
                f"{path}: malformed GGUF header: tensor {t.name!r} at data offset {t.offset} "
                f"is not aligned to {alignment}"
            )
        known = GGML_TYPES.get(t.ggml_type)
        # a type newer than this table is accepted; only its extent cannot be checked
        nbytes = 0
        if known is not None:
            _, block, type_size = known
            if t.shape[0] % block:
                raise ImportRejected(
                    f"{path}: malformed GGUF header: tensor {t.name!r} of type {known[0]} has a first "
                    f"dimension of {t.shape[0]}, not a multiple of its block size {block}"
                )
            nbytes = t.elements // block * type_size
        end = data_offset + t.offset + nbytes
        if end > size:
            raise ImportRejected(
                f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end}, the file has {size} bytes"
            )


def gguf_capabilities(header: GgufHeader) -> dict[str, Any]:
    """The capabilities a GGUF header tells: architecture, context length, size, quantization, chat template."""
    meta = header.metadata
    caps: dict[str, Any] = {"format": f"gguf v{header.version}"}
    arch = meta.get("general.architecture")
    if isinstance(arch, str) and arch:
        caps["architecture"] = arch
        for key in ("context_length", "embedding_length", "block_count", "expert_count"):
            value = meta.get(f"{arch}.{key}")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                caps[key] = value
    if header.tensors:
        caps["parameter_count"] = header.parameter_count
        caps["tensor_count"] = len(header.tensors)
    label = meta.get("general.size_label")
    if isinstance(label, str) and label:
        caps["size_label"] = label
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int) and file_type in GGUF_FILE_TYPES:
        caps["quantization"] = GGUF_FILE_TYPES[file_type]
    elif header.tensors:
        caps["quantization"] = _dominant_type(header.tensors)
    template = meta.get("tokenizer.chat_template")
    caps["chat_template"] = isinstance(template, str) and bool(template.strip())
    return caps


def _dominant_type(tensors: list[GgufTensor]) -> str:
    by_type = Counter[int]()
    for t in tensors:
        by_type[t.ggml_type] += t.elements
    ggml_type = by_type.most_common(1)[0][0]
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"type {ggml_type}"


def gguf_folder_capabilities(headers: list[GgufHeader]) -> dict[str, Any]:
    """A split GGUF: key/values from the first part that has them, sizes summed over all parts."""
    if not headers:
        return {}
    main = next((h for h in headers if "general.architecture" in h.metadata), headers[0])
    caps = gguf_capabilities(main)
    tensors = [t for h in headers for t in h.tensors]
    if tensors:
        caps["parameter_count"] = sum(t.elements for t in tensors)
        caps["tensor_count"] = len(tensors)
    return caps
