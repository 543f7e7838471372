"""The one async connection pool, opened and closed explicitly, and driver-error translation.

Nothing waits on PostgreSQL longer than the configured bounds (``[database]`` in the config):
opening a connection is bounded by ``connect_timeout``, getting one from the pool (including
the check that it still works) by ``acquire_timeout``, and a statement by ``statement_timeout``
twice over: PostgreSQL cancels it, and, because a frozen or unreachable server never answers,
the client gives up one second later by shutting the connection's socket down, which fails the
pending read at once and makes the pool drop that connection. Each case is a
:class:`DatabaseUnavailable` naming the database and what timed out.

Nothing outside ``modelcache.db`` imports psycopg.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import jsonvalue
from ..config import DatabaseSettings
from ..errors import Conflict, DatabaseUnavailable, InvalidInput

logger = logging.getLogger(__name__)

# How long past PostgreSQL's own statement_timeout the client waits for any answer: long enough for
# a live server's cancellation to arrive, so only a server that does not answer at all is cut off.
_SERVER_GRACE = 1.0

# For TCP dsns: notice a vanished host on idle connections (the LISTEN one above all). Ignored by
# libpq for Unix sockets; a dsn that sets these keeps its own values.
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3"}


class BoundedConnection(psycopg.AsyncConnection):
    """A connection whose every round trip to the server is bounded on the client side.

    ``round_trip_limit`` seconds after a round trip started without an answer, the socket is shut
    down: the pending wait fails with an OperationalError at once (no cancel request, which a
    frozen server would not answer either), and the connection is broken, so the pool discards it.
    """

    round_trip_limit: float | None = None
    timed_out_after: float | None = None

    # psycopg routes every exchange on an open connection (execute, fetch, commit, the transaction
    # block's BEGIN/COMMIT) through wait(): the one place to arm a watchdog.
    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        limit = self.round_trip_limit
        if limit is None:
            return await super().wait(gen, *args, **kwargs)
        watchdog = asyncio.get_running_loop().call_later(limit, self._sever, limit)
        try:
            return await super().wait(gen, *args, **kwargs)
        finally:
            watchdog.cancel()

    def _sever(self, limit: float) -> None:
        self.timed_out_after = limit
        try:
            fd = self.pgconn.socket
        except psycopg.Error:
            return  # already closed
        try:
            # shutdown() acts on the socket, not the descriptor: a duplicate is enough, and psycopg's
            # own descriptor is left for psycopg to close
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            logger.debug("could not shut down a timed-out connection's socket: %s", exc)


Connection = BoundedConnection

# The deadline (time.monotonic()) of the acquisition in progress in this task, for the pool's check.
_acquire_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("acquire_deadline", default=None)

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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@asynccontextmanager
async def translated_errors(where: str = "") -> AsyncIterator[None]:
    """Turn driver errors into modelcache errors, keyed on constraint names.

    ``where`` names the database (:func:`describe_dsn`) in the errors saying it is unavailable.
    """
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        name = exc.diag.constraint_name or ""
        raise Conflict(_CONFLICTS.get(name, f"unique constraint {name} violated")) from exc
    except psycopg.errors.DataError as exc:
        # e.g. a NUL character, which PostgreSQL text and jsonb cannot hold
        raise InvalidInput(f"value not storable: {_first_line(exc)}") from exc
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"value not storable: {exc.reason} (a lone surrogate in a string?)") from exc
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise DatabaseUnavailable(f"PostgreSQL {where or 'database'} unavailable: {_first_line(exc)}") from exc


class Database:
    """One psycopg-pool for the process. Call :meth:`open` before use and :meth:`close` after.

    ``limits`` holds the pool sizes and timeouts (``[database]`` in the config); its ``dsn`` is
    not used: ``dsn`` is where the database really is (the embedded one's, when none is configured).
    """

    def __init__(self, dsn: str, limits: DatabaseSettings | None = None) -> None:
        limits = limits or DatabaseSettings()
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self.limits = limits
        self._conninfo = _bounded_conninfo(dsn, limits.connect_timeout)
        self._pool = AsyncConnectionPool(
            self._conninfo,
            connection_class=BoundedConnection,
            min_size=limits.pool_min_size,
            max_size=limits.pool_max_size,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": True},
            configure=self._configure,
            # a broken connection is found before it is handed out, so the
            # pool heals by itself when PostgreSQL comes back
            check=self._check,
            timeout=limits.acquire_timeout,
            name="modelcache",
        )

    @property
    def _round_trip_limit(self) -> float:
        return self.limits.statement_timeout + _SERVER_GRACE

    async def _configure(self, conn: BoundedConnection) -> None:
        conn.round_trip_limit = self._round_trip_limit
        # a row stored before JSON values were bounded must not break every read that returns it
        set_json_loads(jsonvalue.loads_stored, conn)
        await conn.execute("SELECT set_config('statement_timeout', %s, false)",
                           (f"{round(self.limits.statement_timeout * 1000)}ms",))

    async def _check(self, conn: BoundedConnection) -> None:
        # Runs inside acquisition: bounded by what is left of the caller's acquire deadline, so a
        # frozen server costs the caller acquire_timeout, not acquire_timeout plus a statement bound.
        deadline = _acquire_deadline.get()
        left = self.limits.acquire_timeout if deadline is None else deadline - time.monotonic()
        conn.round_trip_limit = max(left, 0.05)
        await AsyncConnectionPool.check_connection(conn)

    async def open(self, timeout: float = 30) -> None:
        try:
            await self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            await self._pool.close()
            reason = f"no connection within {timeout:g}s"
            try:  # one direct attempt, to tell the user why
                conn = await psycopg.AsyncConnection.connect(self._conninfo)
                await conn.close()
            except psycopg.Error as direct:
                reason = _first_line(direct)
            raise DatabaseUnavailable(f"cannot reach PostgreSQL at {self.where}: {reason}") from exc

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def connection(self, timeout: float | None = None,
                         statement_timeout: float | None = None) -> AsyncIterator[Connection]:
        """A connection for a few statements; never hold it while hashing or copying.

        ``timeout`` bounds getting it (default ``acquire_timeout``); ``statement_timeout`` bounds each
        round trip on it on the client side (default ``statement_timeout`` plus a second's grace).
        """
        acquire = self.limits.acquire_timeout if timeout is None else timeout
        async with translated_errors(self.where):
            token = _acquire_deadline.set(time.monotonic() + acquire)
            try:
                conn = await self._pool.getconn(timeout=acquire)
            except PoolTimeout as exc:
                raise DatabaseUnavailable(
                    f"PostgreSQL {self.where}: no working connection within {acquire:g}s "
                    "(database.acquire_timeout)") from exc
            finally:
                _acquire_deadline.reset(token)
            conn.round_trip_limit = self._round_trip_limit if statement_timeout is None else statement_timeout
            try:
                yield conn
            except psycopg.OperationalError as exc:
                raise self._explain(conn, exc) from exc
            finally:
                # a connection cut off by its watchdog is broken: the pool drops it and opens another
                conn.round_trip_limit = self._round_trip_limit
                await self._pool.putconn(conn)

    def _explain(self, conn: BoundedConnection, exc: psycopg.OperationalError) -> Exception:
        if conn.timed_out_after is not None:
            return DatabaseUnavailable(
                f"PostgreSQL {self.where} did not answer within {conn.timed_out_after:g}s "
                "(database.statement_timeout); the connection was dropped")
        if isinstance(exc, psycopg.errors.QueryCanceled) and exc.diag.message_primary and \
                "statement timeout" in exc.diag.message_primary:
            return DatabaseUnavailable(
                f"PostgreSQL {self.where} cancelled a statement that ran longer than "
                f"{self.limits.statement_timeout:g}s (database.statement_timeout)")
        return DatabaseUnavailable(f"PostgreSQL {self.where} unavailable: {_first_line(exc)}")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def dedicated_connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection of its own, outside the pool, for work that may rightly take long
        (migrations waiting on each other's lock, LISTEN). Opening it is bounded by
        ``connect_timeout``; its statements are not bounded."""
        async with translated_errors(self.where):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, row_factory=dict_row)
            async with conn:
                yield conn

    async def ping(self, timeout: float = 1.0) -> None:
        """Raise :class:`DatabaseUnavailable` unless PostgreSQL answers ``SELECT 1`` within about ``timeout``."""
        async with self.connection(timeout=timeout, statement_timeout=timeout) as conn:
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
        what it may have missed while disconnected. The connection is outside
        the pool and its wait for notifications is not bounded by the statement
        timeout; opening it is bounded by ``connect_timeout``.
        """
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.OperationalError as exc:
                logger.debug("listen: cannot connect to %s: %s", self.where, exc)
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
                logger.warning("notifications from %s lost (%s); reconnecting", self.where,
                               str(exc).strip() or type(exc).__name__)
                await _sleep_or_stop(stop, retry_seconds)


def _bounded_conninfo(dsn: str, connect_timeout: float) -> str:
    """The dsn with our connect_timeout, and TCP keepalives unless it sets its own."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnavailable(f"the database dsn does not parse: {_first_line(exc)}") from exc
    extra = {key: value for key, value in _KEEPALIVES.items() if key not in given}
    # libpq counts connect_timeout in whole seconds, at least 2
    return psycopg.conninfo.make_conninfo(dsn, connect_timeout=str(max(2, round(connect_timeout))), **extra)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
