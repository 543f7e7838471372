"""``/healthz`` (the process answers) and ``/readyz`` (database and store usable)."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from ..errors import DatabaseUnavailable
from .keys import DATABASE, STORE


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    problems = await readiness(request.app)
    if problems:
        return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
    return web.Response(text="ready\n")


async def readiness(app: web.Application) -> list[str]:
    """Why the server is not ready (the database, the store), one reason each; empty when it is."""
    problems = []
    try:
        # bounded by the pool itself (a connection within 1s, its answer within 1s more); an asyncio
        # timeout around it would make psycopg try to cancel the query on a server that may not answer
        await app[DATABASE].ping(timeout=1)
    except DatabaseUnavailable as exc:
        problems.append(f"database: {exc.detail}")
    store = app[STORE]
    if not await asyncio.to_thread(os.access, store.tmp_dir, os.W_OK):
        problems.append(f"store: {store.tmp_dir} is not writable")
    return problems
