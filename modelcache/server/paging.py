"""Paging, one rule for every protocol: counts are ASCII digits within bounds, pages follow a sort key.

``/v1`` lists page by an opaque keyset cursor (``db/rows.py``), ``/v2`` lists by
``n`` and ``last`` (distribution-spec), ``/hf`` tree listings by ``limit`` and a
cursor in a ``Link`` header (the Hub's). Each protocol keeps its own names;
the numbers they take are parsed here, and in-memory lists are cut here.
"""

from __future__ import annotations

import bisect
from typing import Callable, Sequence, TypeVar

from ..errors import InvalidInput

T = TypeVar("T")

_MAX_DIGITS = 9


def parse_count(text: str, what: str, lo: int, hi: int) -> int:
    """An integer from ``lo`` to ``hi`` written in ASCII digits (not ``²``, ``١`` or 4,000 digits)."""
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        shown = text if len(text) <= 20 else f"{text[:20]}..."
        raise InvalidInput(f"invalid {what} {shown!r}: expected an integer from {lo} to {hi}")
    return int(text)


def page_after(items: Sequence[T], key: Callable[[T], str], after: str | None,
               limit: int | None) -> tuple[list[T], bool]:
    """At most ``limit`` (all if None) of ``items`` (sorted by ``key``) whose key sorts after
    ``after`` (exclusive); and whether more follow."""
    start = 0 if after is None else bisect.bisect_right([key(i) for i in items], after)
    if limit is None:
        return list(items[start:]), False
    return list(items[start:start + limit]), start + limit < len(items)
