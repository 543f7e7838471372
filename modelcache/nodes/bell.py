"""Wakes the long-polls of nodes waiting for load requests: one LISTEN connection per process.

A request for ``GET /v1/nodes/{id}/loads?wait=N`` that finds nothing open registers an event
here *before* it reads the database, then waits on it: a load request created meanwhile (by this
process, which rings at once, or by another, whose trigger notifies ``modelcache_loads`` with the
node id) sets it, and the request reads again. No loop polls the database. After the LISTEN
connection (re)connects every waiter is woken, since a notification may have been missed.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from typing import Iterator

from ..db import Database
from ..db.nodes import LOADS_CHANNEL

logger = logging.getLogger(__name__)


class LoadBell:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._db.listen([LOADS_CHANNEL], self._on_notify, self._on_connect,
                                                         self._stop), name="load-bell")

    async def stop(self) -> None:
        self._stop.set()
        self.ring_all()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @contextmanager
    def waiting(self, node_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``node_id`` may have a new load request; register before reading."""
        event = asyncio.Event()
        self._waiting.setdefault(node_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiting.get(node_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[node_id]

    def ring(self, node_id: str) -> None:
        for event in self._waiting.get(node_id, ()):
            event.set()

    def ring_all(self) -> None:
        for waiters in self._waiting.values():
            for event in waiters:
                event.set()

    def _on_notify(self, channel: str, payload: str) -> None:
        self.ring(payload)

    async def _on_connect(self) -> None:
        self.ring_all()
