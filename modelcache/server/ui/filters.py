"""Jinja filters the templates share: byte counts, times and ages as people read them."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jinja2

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size(n: Any) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return "—"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def when(t: dt.datetime | None) -> str:
    """A timestamp in UTC, to the second."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def stamp(t: dt.datetime | None) -> str:
    """A timestamp in UTC, compact, for tables whose heading says UTC: '12-02 01:37:45'."""
    return t.astimezone(dt.timezone.utc).strftime("%m-%d %H:%M:%S") if t else "—"


def ago(t: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """How long ago, roughly: '40 s ago', '3 min ago', '2 h ago', '5 d ago'."""
    if t is None:
        return "never"
    seconds = ((now or dt.datetime.now(dt.timezone.utc)) - t).total_seconds()
    if seconds < 0:
        return "just now"
    for limit, unit, div in ((90, "s", 1), (5400, "min", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // div)} {unit} ago"
    return f"{int(seconds // 86400)} d ago"


def duration(seconds: Any) -> str:
    """A span of time ahead, roughly: '8 s', '4 min 10 s', '2 h 5 min'."""
    if seconds is None:
        return "—"
    s = max(0, int(round(float(seconds))))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def install(env: jinja2.Environment) -> None:
    env.filters.update(size=size, when=when, stamp=stamp, ago=ago, duration=duration)
