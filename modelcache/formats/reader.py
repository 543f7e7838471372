"""Bounded reads of what a file says about itself: header bytes and small JSON objects (blocking).

Every length read from a header is checked against the file's size before
anything is allocated, so a damaged or hostile header costs an error naming
the file and the offset, never a huge allocation.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from .. import jsonvalue
from ..errors import ImportRejected

# a snapshot's config.json, tokenizer_config.json or safetensors index (the largest seen are a few MiB)
MAX_JSON_FILE_BYTES = 64 << 20


def load_json_object(raw: bytes, max_bytes: int) -> dict:
    """A JSON object from bytes (a sidecar, a manifest, a header); ValueError says what is wrong.

    Nesting is bounded as for every JSON value from outside (:mod:`modelcache.jsonvalue`); members,
    strings and integers only by ``max_bytes`` and the parser: a safetensors header names
    thousands of tensors, and files made by others hold huge integers.
    """
    doc = jsonvalue.loads(raw, max_bytes=max_bytes, max_members=max_bytes, max_string=max_bytes,
                           max_int=None)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def read_placed_json(path: Path, max_bytes: int) -> Any:
    """A JSON value from a file people place (the import folder): read only if ``path`` itself is a
    regular file (a link is not followed, as the importer follows none; a FIFO or a device is not waited
    on) and at most ``max_bytes``. ValueError says why not; OSError if it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("a symbolic link: links are not followed") from None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        raw = f.read(max_bytes + 1)
    return jsonvalue.loads(raw, max_bytes=max_bytes, max_members=max_bytes, max_string=max_bytes, max_int=None)


def read_json_file(path: Path) -> Any:
    """A small JSON file of a snapshot (config.json, an index); ImportRejected naming it when it is not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_FILE_BYTES + 1)
        return jsonvalue.loads(raw, max_bytes=MAX_JSON_FILE_BYTES, max_members=MAX_JSON_FILE_BYTES,
                               max_string=MAX_JSON_FILE_BYTES, max_int=None)
    except ValueError as exc:
        raise ImportRejected(f"{path}: {exc}") from None


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
