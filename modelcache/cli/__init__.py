"""The ``modelcache`` command: a thin click layer over library functions.

One module per area: ``processes`` (run, serve, syncd), ``host`` (verbs acting on the cache host's
database and store: db, token, import), ``admin`` (verbs over the management API).

Option defaults are ``None`` so the real defaults live only in config.py.
Errors become exit codes in one place, :class:`_Group.invoke`: 1 for a
failed operation, 2 for bad usage or a bad value, with one line on stderr.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .. import logs
from ..config import Settings, load
from ..errors import ConfigError, InvalidInput, ModelcacheError

logger = logging.getLogger(__name__)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, InvalidInput) as exc:
            click.echo(f"modelcache: error: {exc.detail}", err=True)
            sys.exit(2)
        except ModelcacheError as exc:
            click.echo(f"modelcache: error: {exc.detail}", err=True)
            sys.exit(1)


def _host_options(host_port: str | None = None) -> Callable:
    """--config, --data-dir, --dsn -> a ``settings`` argument; with ``host_port`` also --host and --port
    (DESIGN's stable surface for run, serve and syncd): ``"listen"`` where the process listens,
    ``"url"`` where it does not and uses them only for the server URL it logs."""

    def decorate(fn: Callable) -> Callable:
        @click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                      help="TOML config file (also MODELCACHE_CONFIG).")
        @click.option("--data-dir", default=None, help="Data directory (storage.data_dir).")
        @click.option("--dsn", default=None, help="PostgreSQL dsn; empty: embedded PostgreSQL under the data dir.")
        @functools.wraps(fn)
        def wrapper(config_file: Path | None, data_dir: str | None, dsn: str | None,
                    host: str | None = None, port: str | None = None, **kwargs: Any) -> Any:
            settings = load(config_file, overrides={
                "storage.data_dir": data_dir, "database.dsn": dsn, "server.host": host, "server.port": port,
            })
            logs.configure(settings.log)
            return fn(settings=settings, **kwargs)

        if host_port is not None:
            where = "to listen on" if host_port == "listen" else "of the server that serves what this process stores"
            wrapper = click.option("--port", default=None, help=f"Port {where} (server.port).")(wrapper)
            wrapper = click.option("--host", default=None, help=f"Address {where} (server.host).")(wrapper)
        return wrapper

    return decorate


@click.group(cls=_Group)
@click.version_option(package_name="modelcache")
def main() -> None:
    """modelcache: a model artifact cache for on-premises AI clusters."""




def _with_database(settings: Settings, work: Callable, migrate_first: bool = True) -> Any:
    """Run ``work(db)`` against the host's database (the embedded one is joined or started)."""
    from ..db.migrate import migrate
    from ..runtime import open_database

    async def go() -> Any:
        async with open_database(settings, wait=5) as db:
            if migrate_first:
                await migrate(db)
            return await work(db)

    return asyncio.run(go())


def _progress_bar(desc: str, total: int | None = None) -> Any:
    """A bytes bar on stderr, drawn only when stderr is a terminal: stdout's last line stays the result."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=None)


from . import admin, host, node, nodes, processes  # noqa: E402,F401 - each module adds its commands to main
