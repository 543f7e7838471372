"""The Nodes page: nodes x model versions with each node's reported status and the age of the report;
stale nodes and failed reports highlighted; the load requests and their state.

It reads ``GET /v1/nodes``, ``GET /v1/availability`` and ``GET /v1/loads`` through ``ui.invoke``,
as the API would answer them. ``/ui/nodes/live`` renders the grid and the load requests alone, from
the same template, for ``live.js`` to swap in every second while the tab is visible.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..v1 import nodes as v1
from ..v1.types import MAX_LIMIT
from .pages import Ui, page

NODES_SHOWN = 200
LOADS_SHOWN = 50


@dataclass
class Column:
    """A model version some node reported on or was asked to load."""

    id: uuid.UUID
    label: str


@dataclass
class Row:
    node: Any  # v1 NodeOut
    cells: dict[uuid.UUID, Any] = field(default_factory=dict)  # version id -> AvailabilityOut
    loads: dict[uuid.UUID, Any] = field(default_factory=dict)  # version id -> the open LoadOut

    @property
    def failed(self) -> bool:
        return any(a.status == "failed" for a in self.cells.values())


def _label(vendor: str | None, model: str, version: str) -> str:
    return f"{vendor + '/' if vendor else ''}{model}:{version}"


async def _all_availability(ui: Ui) -> list[Any]:
    """Every report, page after page: a column is a version any node reported on, so the grid needs all."""
    held: list[Any] = []
    cursor = None
    while True:
        query = {"limit": str(MAX_LIMIT)} | ({"cursor": cursor} if cursor else {})
        got = await ui.invoke(v1.all_availability, query=query)
        held += got.availability
        if (cursor := got.next_cursor) is None:
            return held


async def _grid(ui: Ui) -> dict[str, Any]:
    nodes = await ui.invoke(v1.list_nodes, query={"limit": str(NODES_SHOWN)})
    held = await _all_availability(ui)
    loads = await ui.invoke(v1.list_all_loads, query={"limit": str(LOADS_SHOWN)})
    rows = {n.id: Row(n) for n in nodes.nodes}
    columns: dict[uuid.UUID, Column] = {}
    for a in held:
        columns.setdefault(a.model_version_id, Column(a.model_version_id, _label(a.vendor, a.model, a.version)))
        if a.node_id in rows:
            rows[a.node_id].cells[a.model_version_id] = a
    for load in loads.loads:
        if load.state in ("pending", "loading"):
            columns.setdefault(load.model_version_id,
                               Column(load.model_version_id, _label(load.vendor, load.model, load.version)))
            if load.node_id in rows:
                rows[load.node_id].loads[load.model_version_id] = load
    names = {n.id: n.name for n in nodes.nodes}
    return {"rows": list(rows.values()), "columns": sorted(columns.values(), key=lambda c: c.label),
            "more_nodes": nodes.next_cursor is not None, "loads": loads.loads, "node_names": names,
            "more_loads": loads.next_cursor is not None}


@page("/ui/nodes", "nodes.html")
async def nodes_page(request: web.Request, ui: Ui) -> dict:
    return await _grid(ui)


@page("/ui/nodes/live", "nodes_live.html", fragment=True)
async def nodes_live(request: web.Request, ui: Ui) -> dict:
    """The grid and the load requests alone, for live.js."""
    return await _grid(ui)
