"""Process lifecycles: open the database (embedded or not), then serve and/or watch until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator

from aiohttp import web

from .config import Settings
from .db import Database, describe_dsn
from .db.embedded import EmbeddedPostgres
from .db.migrate import migrate

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_database(settings: Settings, wait: float = 30, supervise: bool = False) -> AsyncIterator[Database]:
    """The configured database, or the embedded one under ``<data_dir>/pg``; closed on exit.

    ``wait`` is how long to wait for PostgreSQL: long for servers (it may be
    starting beside us), short for one-shot CLI verbs. ``supervise`` (the
    long-running processes) restarts the embedded PostgreSQL whenever it dies.
    """
    embedded = None
    dsn = settings.database.dsn
    if not dsn:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        embedded = EmbeddedPostgres(settings.data_dir / "pg")
        dsn = await asyncio.to_thread(embedded.start)
    db = Database(dsn, settings.database)
    stop_supervising = asyncio.Event()
    supervisor = None
    try:
        await db.open(timeout=wait)
        if supervise and embedded is not None:
            supervisor = asyncio.create_task(embedded.supervise(stop_supervising), name="embedded-postgres")
        yield db
    finally:
        if supervisor is not None:
            # not cancelled: a restart in progress finishes before the postmaster is left
            stop_supervising.set()
            await supervisor
        await db.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def database_label(settings: Settings) -> str:
    if settings.database.dsn:
        return f"PostgreSQL {describe_dsn(settings.database.dsn)}"
    return f"embedded PostgreSQL in {settings.data_dir / 'pg'}"


async def run(settings: Settings, *, serve: bool = True, watch: bool = True, fetch: bool = False) -> None:
    """``modelcache run`` (all), ``serve`` (server only), ``syncd`` (import daemon only) or ``fetchd``
    (downloads only), until SIGTERM/SIGINT."""
    from .server.access import connection_options
    from .server.app import create_app
    from .server.protocol import Runner

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with open_database(settings, supervise=True) as db:
        await migrate(db)
        runner = None
        if serve:
            runner = Runner(create_app(settings, db), handle_signals=False, shutdown_timeout=5,
                            **connection_options(settings))
            await runner.setup()
            site = web.TCPSite(runner, settings.server.host, settings.server.port, reuse_address=True)
            await site.start()
            logger.info("serving on %s (listening on %s:%d)", settings.public_url, settings.server.host,
                        settings.server.port)
        else:
            logger.info("not serving; what this process stores is served by %s", settings.public_url)
        logger.info("data dir %s; import folder %s; database: %s", settings.data_dir, settings.import_dir,
                    database_label(settings))
        await _hint_first_token(db, settings)
        background: list[asyncio.Task] = []
        if serve:
            background.append(asyncio.create_task(_sweep_quietly(db, settings), name="sweep"))
        scrubber = None
        if serve and settings.storage.scrub_interval > 0:
            from .scrub import scrub_forever
            from .store import BlobStore

            scrubber = asyncio.create_task(
                scrub_forever(db, BlobStore(settings.data_dir), settings.storage.scrub_interval, stop))
            logger.info("scrubbing every blob every %gs", settings.storage.scrub_interval)
        daemon = None
        if watch:
            from .syncd.daemon import SyncDaemon

            daemon = SyncDaemon(settings, db)
            await daemon.start()
        fetcher = None
        if fetch:
            from .downloads.worker import DownloadWorker
            from .store import BlobStore

            store = BlobStore(settings.data_dir)
            if not serve:  # the server prepares the store itself
                await asyncio.to_thread(store.prepare)
            fetcher = DownloadWorker(settings, db, store)
            await fetcher.start()
        try:
            await stop.wait()
            logger.info("stopping")
        finally:
            if fetcher is not None:
                await fetcher.stop()
            if scrubber is not None:
                background.append(scrubber)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if daemon is not None:
                await daemon.stop()
            if runner is not None:
                await runner.cleanup()
    logger.info("stopped")


async def _hint_first_token(db: Database, settings: Settings) -> None:
    from .tokens import all_tokens

    if not any(t["revoked_at"] is None for t in await all_tokens(db)):
        where = "--dsn DSN" if settings.database.dsn else f"--data-dir {settings.data_dir}"
        logger.info("no API tokens yet; create the admin token with: modelcache token create --role admin "
                    "--name admin %s", where)


async def _sweep_quietly(db: Database, settings: Settings) -> None:
    from .errors import ModelcacheError
    from .store import BlobStore
    from .sweep import sweep

    try:
        await sweep(db, BlobStore(settings.data_dir))
    except ModelcacheError as exc:
        logger.warning("start-up sweep of the store skipped: %s", exc.detail)
