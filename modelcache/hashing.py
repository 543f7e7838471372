"""Hashing lives here: one read pass gives sha256 (the identity) and xxh3-128 (a fast fingerprint)."""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Callable

import xxhash

from .digest import Digest

# 1 MiB reads measured fastest here (they stay in L2); see reference/perf-baseline.md.
CHUNK = 1 << 20


class Hasher:
    """sha256 and xxh3-128 over the same bytes, plus the byte count."""

    __slots__ = ("_sha256", "_xxh3", "size")

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._xxh3 = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        self._xxh3.update(data)
        self.size += len(data)

    @property
    def digest(self) -> Digest:
        return Digest(self._sha256.hexdigest())

    @property
    def xxh3(self) -> str:
        return self._xxh3.hexdigest()


def hash_stream(src: BinaryIO, sink: Callable[[memoryview], object] | None = None,
                progress: Callable[[int], object] | None = None) -> Hasher:
    """Read ``src`` to its end once, hashing every byte and handing each chunk to ``sink``.

    ``progress`` is told the size of each chunk once it is hashed (and sunk).
    """
    hasher = Hasher()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = src.readinto(buf)
        if not n:
            return hasher
        chunk = view[:n]
        hasher.update(chunk)
        if sink is not None:
            sink(chunk)
        if progress is not None:
            progress(n)
