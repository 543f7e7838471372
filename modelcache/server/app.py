"""The app factory: it only assembles. Resources open in cleanup contexts, not here."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from aiohttp import web

from .. import logs
from ..config import Settings
from ..db import Database
from ..store import BlobStore
from . import health, ui
from .blobs import denials
from .blobs import serve as blobs
from .hf import routes as hf
from .oci import routes as oci
from .v1 import admin, api, downloads, imports, nodes, openapi, registry  # noqa: F401 - the API modules declare endpoints
from .catalog import Catalog
from .keys import CATALOG, DATABASE, METRICS, NODE_BELL, OPENAPI, SETTINGS, STORE
from ..db.nodes import LOADS_CHANNEL
from ..nodes.bell import LoadBell
from ..nodes.registry import expire_forever
from .errors import errors_middleware
from .metrics import Metrics, serve_metrics

logger = logging.getLogger(__name__)

DIGEST_PATTERN = "{digest:[^/]+}"


def create_app(settings: Settings, db: Database) -> web.Application:
    """Assemble the server around an open, migrated database."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[DATABASE] = db
    app[STORE] = BlobStore(settings.data_dir)
    app[CATALOG] = Catalog(db)
    app[METRICS] = Metrics()
    app[OPENAPI] = openapi.build()
    app.cleanup_ctx.append(_access_log_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_catalog_ctx)
    app[NODE_BELL] = LoadBell()
    app[CATALOG].listen(LOADS_CHANNEL, app[NODE_BELL].ring, app[NODE_BELL].ring_all)
    app.cleanup_ctx.append(_nodes_ctx)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/v1/openapi.json", openapi.serve_openapi)
    denials.setup(app)
    app.router.add_get(f"/v1/blobs/{DIGEST_PATTERN}", denials.pull(blobs.get_blob))  # also answers HEAD
    api.add_routes(app)
    hf.setup(app)  # the Hugging Face mirror under /hf
    oci.setup(app)  # the OCI pull API under /v2, for Ollama and registry clients
    ui.setup(app)  # the dashboard under /ui
    return app


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """Write the buffered access-log lines twice a second (see logs.LineBuffer)."""

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(0.5)
            logs.flush()

    task = asyncio.create_task(flush_forever(), name="access-log-flush")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    logs.flush()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    removed = await asyncio.to_thread(app[STORE].prepare)
    if removed:
        logger.info("removed %d leftover temp files from %s", removed, app[STORE].tmp_dir)
    yield


async def _nodes_ctx(app: web.Application) -> AsyncIterator[None]:
    """Fail loads whose node went silent (nodes.loading_timeout); wake long-polling nodes at the end."""
    stop = asyncio.Event()
    task = asyncio.create_task(expire_forever(app[DATABASE], app[SETTINGS], stop), name="node-load-timeouts")
    yield
    stop.set()
    await asyncio.gather(task, return_exceptions=True)
    app[NODE_BELL].stop()


async def _catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[CATALOG].start()
    logger.info("serving %d blobs to %d tokens", app[CATALOG].blob_count(), len(app[CATALOG].tokens))
    yield
    await app[CATALOG].stop()
