"""The overview: how full the cache is and with what, what it holds by state, traffic over the last day,
the import folder (waiting and failed files), and whether the server is ready."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ... import preferences
from ...db import artifacts, dashboard
from ...errors import DatabaseUnavailable
from ...syncd.failed import list_failed
from ...syncd.scan import scan
from ..health import readiness
from ..keys import DATABASE, SETTINGS
from ..v1 import admin
from . import traffic
from .pages import Ui, page

CLASSES = ("pinned", "promoted", "staged", "other")  # the usage bar's parts, left to right
ARTIFACT_STATES = ("promoted", "staged", "evicted", "quarantined")
BLOB_STATES = ("present", "evicted", "quarantined")
WAITING_SHOWN = 50
CHART_W, CHART_H, CHART_PAD = 960, 160, 4


@page("/ui/", "overview.html")
async def overview(request: web.Request, ui: Ui) -> dict[str, Any]:
    app = request.app
    now = dt.datetime.now(dt.timezone.utc)
    traffic.sample(app)
    hours = traffic.hours(now)
    problems = await readiness(app)
    stock: dict[str, Any] = {"usage": {}, "artifacts": {}, "blobs": {}, "downloaded": {}}
    max_bytes = preferences.KEYS["models.cache.max_bytes"].default
    if not any(p.startswith("database:") for p in problems):  # else the page says why, and little else
        try:
            prefs: admin.PreferenceList = await ui.invoke(admin.list_preferences)
            max_bytes = next(p.value for p in prefs.preferences if p.key == "models.cache.max_bytes")
            async with app[DATABASE].connection() as conn:
                stock["usage"] = await dashboard.usage_by_class(conn)
                stock["artifacts"] = await artifacts.counts_by_state(conn)
                stock["blobs"] = await dashboard.blob_counts_by_state(conn)
                stock["downloaded"] = await dashboard.downloaded_by_hour(conn, hours[0])
        except DatabaseUnavailable as exc:
            problems.append(f"database: {exc.detail}")
    served = [app[traffic.SERVED].by_hour.get(h, 0.0) for h in hours]
    downloaded = [float(stock["downloaded"].get(h, 0)) for h in hours]
    folder = await asyncio.to_thread(import_folder, app[SETTINGS].import_dir)
    return {"bar": usage_bar(stock["usage"], max_bytes), "max_bytes": max_bytes,
            "used": sum(stock["usage"].values()), "artifact_counts": stock["artifacts"],
            "blob_counts": stock["blobs"], "artifact_states": ARTIFACT_STATES, "blob_states": BLOB_STATES,
            "chart": chart(hours, served, downloaded), "served_24h": sum(served), "downloaded_24h": sum(downloaded),
            "folder": folder, "problems": problems}


@dataclass
class Part:
    name: str
    bytes: int
    x: float  # percent of the bar
    width: float


def usage_bar(usage: dict[str, int], max_bytes: int) -> list[Part]:
    """The usage bar's parts, as percentages of the larger of the limit and what is used (so an
    over-full cache shows a full bar rather than one running off the edge)."""
    scale = max(max_bytes, sum(usage.values()), 1)
    parts, x = [], 0.0
    for name in CLASSES:
        n = usage.get(name, 0)
        width = 100.0 * n / scale
        parts.append(Part(name, n, round(x, 3), round(width, 3)))
        x += width
    return parts


def chart(hours: list[dt.datetime], served: list[float], downloaded: list[float]) -> dict[str, Any]:
    """Two polylines over 24 hourly points, scaled to the larger series; drawn by the template as SVG."""
    top = max(max(served), max(downloaded), 1.0)
    step = (CHART_W - 2 * CHART_PAD) / (len(hours) - 1)

    def points(values: list[float]) -> str:
        return " ".join(f"{CHART_PAD + i * step:.1f},{CHART_H - CHART_PAD - (CHART_H - 2 * CHART_PAD) * v / top:.1f}"
                        for i, v in enumerate(values))

    return {"width": CHART_W, "height": CHART_H, "served": points(served), "downloaded": points(downloaded),
            "top": top, "first": hours[0], "last": hours[-1],
            "rows": list(zip(hours, served, downloaded))}


def import_folder(import_dir: Path) -> dict[str, Any]:
    """What waits in the import folder (and why, if it cannot be imported) and what failed (blocking)."""
    if not import_dir.is_dir():
        return {"dir": str(import_dir), "exists": False, "waiting": [], "failed": [], "more_waiting": 0}
    now = time.time()
    waiting = []
    for c in scan(import_dir):
        size = sum(entry[2] for entry in c.fingerprint)
        newest = max((entry[3] for entry in c.fingerprint), default=0) / 1e9
        waiting.append({"path": c.path.relative_to(import_dir).as_posix(), "kind": c.kind, "size": size,
                        "unchanged_for": max(0.0, now - newest) if newest else None,
                        "why": c.reason or c.waiting})
    return {"dir": str(import_dir), "exists": True, "waiting": waiting[:WAITING_SHOWN],
            "more_waiting": max(0, len(waiting) - WAITING_SHOWN), "failed": list_failed(import_dir)}
