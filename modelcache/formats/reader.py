"""Bounded reads of what a file says about itself: header bytes and small JSON objects (blocking).

Every length read from a header is checked against the file's size before
anything is allocated, so a damaged or hostile header costs an error naming
the file and the offset, never a huge allocation.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ImportRejected


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


def read_json_file(path: Path) -> Any:
    """A small JSON file of a snapshot (config.json, an index); ImportRejected naming it when it is not JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportRejected(f"{path}: not valid JSON ({exc})") from None


class HeaderReader:
    """Bounded reads from a header: every length is checked against the file size first."""

    def __init__(self, f: BinaryIO, path: Path, size: int, what: str) -> None:
        self.f, self.path, self.size, self.what = f, path, size, what
        self.pos = 0

    def fail(self, message: str) -> ImportRejected:
        return ImportRejected(f"{self.path}: malformed {self.what} header: {message}")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise ImportRejected(
                f"{self.path}: truncated {self.what} header: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.size} bytes"
            )
        data = self.f.read(n)
        if len(data) != n:  # the file shrank under us
            raise ImportRejected(f"{self.path}: truncated {self.what} header: short read at offset {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.read(n, what)  # raises the truncation error
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string_bytes(self, what: str) -> bytes:
        return self.read(self.u64(f"length of {what}"), what)

    def text(self, what: str) -> str:
        try:
            return self.string_bytes(what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos} is not UTF-8") from None
