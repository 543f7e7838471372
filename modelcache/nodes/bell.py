"""Wakes the long-polls of nodes waiting for load requests.

A request for ``GET /v1/nodes/{id}/loads?wait=N`` that finds nothing open registers an event
here *before* it reads the database, then waits on it: a load request created meanwhile (by this
process, which rings at once, or by another, whose trigger notifies ``modelcache_loads`` with the
node id, heard on the catalog's one LISTEN connection: ``Catalog.listen``) sets it, and the request
reads again. No loop polls the database. After that connection (re)connects every waiter is woken,
since a notification may have been missed.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator


class LoadBell:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def stop(self) -> None:
        """Wake every waiter: the server is stopping."""
        self.ring_all()

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
