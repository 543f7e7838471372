"""The one async connection pool, opened and closed explicitly, and driver-error translation.

Nothing outside ``modelcache.db`` imports psycopg.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import Conflict, DatabaseUnavailable, InvalidInput

logger = logging.getLogger(__name__)

Connection = psycopg.AsyncConnection

# Unique constraints users can run into, and what they mean to them.
_CONFLICTS = {
    "models_name_vendor_key": "a model with this name and vendor exists",
    "model_versions_model_id_version_key": "this model already has this version",
    "model_artifacts_sha256_key": "an artifact with this sha256 exists",
    "api_tokens_name_key": "a token with this name exists",
    "api_tokens_token_sha256_key": "a token with this secret exists",
}


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without its password, for log lines."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable dsn"
    host = info.get("host") or "local socket"
    port = info.get("port")
    where = f"{host}:{port}" if port else str(host)
    return f"{info.get('dbname', '?')} on {where}"


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Turn driver errors into modelcache errors, keyed on constraint names."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        name = exc.diag.constraint_name or ""
        raise Conflict(_CONFLICTS.get(name, f"unique constraint {name} violated")) from exc
    except psycopg.errors.DataError as exc:
        # e.g. a NUL character, which PostgreSQL text and jsonb cannot hold
        raise InvalidInput(f"value not storable: {str(exc).strip().splitlines()[0]}") from exc
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"value not storable: {exc.reason} (a lone surrogate in a string?)") from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise DatabaseUnavailable(f"database unavailable: {str(exc).strip().splitlines()[0]}") from exc


class Database:
    """One psycopg-pool for the process. Call :meth:`open` before use and :meth:`close` after."""

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 8) -> None:
        self.dsn = dsn
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": True},
            # a broken connection is found before it is handed out, so the
            # pool heals by itself when PostgreSQL comes back
            check=AsyncConnectionPool.check_connection,
            timeout=10,
            name="modelcache",
        )

    async def open(self, timeout: float = 30) -> None:
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            reason = f"no connection within {timeout:g}s"
            try:  # one direct attempt, to tell the user why
                conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=3)
                await conn.close()
            except psycopg.Error as direct:
                reason = str(direct).strip().splitlines()[0]
            raise DatabaseUnavailable(f"cannot reach PostgreSQL at {describe_dsn(self.dsn)}: {reason}") from exc

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Connection]:
        """A connection for a few statements; never hold it while hashing or copying."""
        async with translated_errors(), self._pool.connection(timeout=timeout) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def ping(self, timeout: float = 1.0) -> None:
        async with self.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    async def listen(
        self,
        channels: list[str],
        on_notify: Callable[[str, str], None],
        on_connect: Callable[[], Awaitable[None]],
        stop: asyncio.Event,
        retry_seconds: float = 1.0,
    ) -> None:
        """LISTEN on ``channels`` on a dedicated connection until ``stop`` is set.

        ``on_connect`` runs after each (re)connection, so the caller can reload
        what it may have missed while disconnected.
        """
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as exc:
                logger.debug("listen: cannot connect: %s", exc)
                await _sleep_or_stop(stop, retry_seconds)
                continue
            try:
                async with conn:
                    for channel in channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    await on_connect()
                    while not stop.is_set():
                        async for note in conn.notifies(timeout=0.5):
                            on_notify(note.channel, note.payload)
                    return
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                logger.warning("database notifications lost (%s); reconnecting", str(exc).strip() or type(exc).__name__)
                await _sleep_or_stop(stop, retry_seconds)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
