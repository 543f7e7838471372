"""A valid GGUF file for the benchmarks: the import refuses ``--type gguf`` on anything else."""

from __future__ import annotations

import struct


def gguf_header(n_floats: int, arch: str = "llama") -> bytes:
    """A GGUF v3 header for one F32 tensor of ``n_floats`` values, padded to the data section.

    Follow it with ``4 * n_floats`` bytes of tensor data (any bytes: random is fine).
    """
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [s("general.architecture") + struct.pack("<I", 8) + s(arch),
           s(f"{arch}.context_length") + struct.pack("<II", 4, 4096),
           s("general.file_type") + struct.pack("<II", 4, 0)]
    tensor = s("weights") + struct.pack("<IQIQ", 1, n_floats, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    return head + b"\0" * (-len(head) % 32)


def gguf_of_size(size: int) -> tuple[bytes, int]:
    """The header of a GGUF file of (about) ``size`` bytes, and how many data bytes follow it."""
    header_len = len(gguf_header(0))  # fixed-width counts: the same for every n_floats
    n_floats = max(1, (size - header_len) // 4)
    return gguf_header(n_floats), 4 * n_floats
