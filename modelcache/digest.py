"""The one digest type. Every digest is parsed here, at the edge, before it is used."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidInput

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
SHA256_PATTERN = r"^sha256:[0-9a-f]{64}$"  # the same rule, for JSON schema


@dataclass(frozen=True, slots=True)
class Digest:
    """A sha256 content digest, ``sha256:<64 lowercase hex>``."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        """Parse ``sha256:<64 lowercase hex>``; anything else is InvalidInput."""
        match = _SHA256.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            shown = text if isinstance(text, str) and len(text) <= 100 else f"{str(text)[:100]}..."
            raise InvalidInput(f"invalid digest {shown!r}: expected sha256:<64 lowercase hex>")
        return cls(match.group(1))

    @classmethod
    def from_hex(cls, hexdigest: str) -> "Digest":
        return cls.parse(f"sha256:{hexdigest}")

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def short(self) -> str:
        """The first 12 hex digits, for log lines and names."""
        return self.hex[:12]
