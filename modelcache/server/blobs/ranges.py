"""The Range header (RFC 9110 section 14), parsed into a type before any disk access."""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110's DIGIT is ASCII ('\d' would take '١' too): a range written otherwise is malformed
_SINGLE = re.compile(r"([0-9]*)-([0-9]*)")
# A position of more digits than this is past the end of any file; it is never converted (int() of
# thousands of digits costs time and raises past 4,300)
_MAX_DIGITS = 18
_BEYOND = 10**_MAX_DIGITS


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


class Unsatisfiable(Exception):
    """A well-formed range that selects no byte of the representation: 416."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range to serve, or None for the whole body.

    None also covers what RFC 9110 lets a server ignore: other units,
    malformed headers (digits other than ASCII ones among them), and
    multi-range requests (answered with the whole body, 200, never 416).
    A position of any number of digits is well-formed (``1*DIGIT``) and read
    for what it is: a first byte past the end (416), a last byte or suffix
    past the end (cut at the end). Raises :class:`Unsatisfiable` for a valid range
    that selects nothing, and for ``last < first`` (so ``bytes=500-0`` is a
    416, as the OCI conformance suite expects).
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SINGLE.fullmatch(spec.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last N bytes
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(first)
    end = _position(last) if last else size - 1
    if end < start or start >= size:
        raise Unsatisfiable
    return ByteRange(start, min(end, size - 1))


def _position(digits: str) -> int:
    """A byte position; one of more than 18 significant digits is past any file's end, as one number."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else _BEYOND
