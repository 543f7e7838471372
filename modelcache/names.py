"""Parsers for the names users give: models, vendors, versions. Parse at the edge, reject, never repair."""

from __future__ import annotations

import re

from .errors import InvalidInput

_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
MODEL_PATTERN = f"^{_MODEL.pattern}$"  # the same rules, for JSON schema
VERSION_PATTERN = f"^{_VERSION.pattern}$"


def parse_model_name(text: str, what: str = "model name") -> str:
    if not isinstance(text, str) or not _MODEL.fullmatch(text):
        raise InvalidInput(
            f"invalid {what} {text!r}: use 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return text


def parse_vendor(text: str | None) -> str | None:
    return None if text in (None, "") else parse_model_name(text, "vendor")


def parse_version(text: str) -> str:
    if not isinstance(text, str) or not _VERSION.fullmatch(text):
        raise InvalidInput(f"invalid version {text!r}: use 1-128 of A-Z a-z 0-9 . _ + -, not starting with . or -")
    return text
