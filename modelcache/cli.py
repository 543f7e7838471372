"""The ``modelcache`` command: a thin click layer over library functions.

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

from . import logs
from .auth import Role, Subject
from .config import Settings, load
from .errors import ConfigError, InvalidInput, ModelcacheError

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


def _host_options(with_listen: bool) -> Callable:
    """--config, --data-dir, --dsn (and --host, --port for the server) -> a ``settings`` argument."""

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

        if with_listen:
            wrapper = click.option("--port", default=None, help="Port to listen on (server.port).")(wrapper)
            wrapper = click.option("--host", default=None, help="Address to listen on (server.host).")(wrapper)
        return wrapper

    return decorate


@click.group(cls=_Group)
@click.version_option(package_name="modelcache")
def main() -> None:
    """modelcache: a model artifact cache for on-premises AI clusters."""


# -- processes ----------------------------------------------------------------


@main.command()
@_host_options(with_listen=True)
def run(settings: Settings) -> None:
    """Run the server and the import daemon in one process (embedded PostgreSQL when no dsn)."""
    from .runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=True))


@main.command()
@_host_options(with_listen=True)
def serve(settings: Settings) -> None:
    """Run the HTTP server only."""
    from .runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=False))


@main.command()
@_host_options(with_listen=False)
def syncd(settings: Settings) -> None:
    """Run the import-folder daemon only."""
    from .runtime import run as run_process

    asyncio.run(run_process(settings, serve=False, watch=True))


# -- bootstrap verbs on the database --------------------------------------------


def _with_database(settings: Settings, work: Callable, migrate_first: bool = True) -> Any:
    from .db.migrate import migrate
    from .runtime import open_database

    async def go() -> Any:
        async with open_database(settings, wait=5) as db:
            if migrate_first:
                await migrate(db)
            return await work(db)

    return asyncio.run(go())


@main.group(cls=_Group)
def db() -> None:
    """Schema migrations."""


@db.command("migrate")
@_host_options(with_listen=False)
def db_migrate(settings: Settings) -> None:
    """Bring the database schema up to date."""
    from .db import registry
    from .db.migrate import migrate

    async def work(db):
        applied = await migrate(db)
        async with db.connection() as conn:
            await registry.audit(conn, Subject.local(), "schema.migrate", "schema", None,
                                 outcome="applied" if applied else "unchanged",
                                 details={"applied": [f"{m.version:04d}_{m.name}" for m in applied]})
        return applied

    applied = _with_database(settings, work, migrate_first=False)
    if applied:
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo("schema is up to date")


@db.command("status")
@_host_options(with_listen=False)
def db_status(settings: Settings) -> None:
    """Show the schema version of the database and of this modelcache."""
    from .db.migrate import status

    state = _with_database(settings, status, migrate_first=False)
    current = "empty" if state.current is None else str(state.current)
    click.echo(f"database: {current}; code: {state.latest}; pending: {len(state.pending)}")
    for m in state.pending:
        click.echo(f"pending {m.version:04d}_{m.name}")


@main.group(cls=_Group)
def token() -> None:
    """API tokens (bootstrap: acts on the database directly)."""


@token.command("create")
@_host_options(with_listen=False)
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
@click.option("--name", required=True, help="A unique name, shown in logs and the audit log.")
@click.option("--node-id", default=None, help="The node's UUID, for node tokens.")
@click.option("--expires-in", default=None, help="Lifetime such as 12h or 30d; default: no expiry.")
def token_create(settings: Settings, role: str, name: str, node_id: str | None, expires_in: str | None) -> None:
    """Mint a token and print its secret on the last line."""
    from .tokens import create_token, parse_duration, parse_node_id

    lifetime = parse_duration(expires_in) if expires_in else None
    node = parse_node_id(node_id)
    secret, row = _with_database(settings, lambda db: create_token(
        db, name=name, role=Role.parse(role), subject=Subject.local(), node_id=node, expires_in=lifetime))
    expiry = row["expires_at"].isoformat() if row["expires_at"] else "never"
    click.echo(f"token {row['name']} (role {row['role']}, expires {expiry}); the secret is shown once:", err=True)
    click.echo(secret)


@token.command("list")
@_host_options(with_listen=False)
def token_list(settings: Settings) -> None:
    """List tokens (never their secrets)."""
    from .tokens import list_tokens

    rows = _with_database(settings, list_tokens)
    click.echo(f"{'NAME':24} {'ROLE':8} {'EXPIRES':25} REVOKED")
    for r in rows:
        expires = r["expires_at"].isoformat(timespec="seconds") if r["expires_at"] else "-"
        revoked = r["revoked_at"].isoformat(timespec="seconds") if r["revoked_at"] else "-"
        click.echo(f"{r['name']:24} {r['role']:8} {expires:25} {revoked}")


@token.command("revoke")
@_host_options(with_listen=False)
@click.argument("name")
def token_revoke(settings: Settings, name: str) -> None:
    """Revoke a token by name; a running server stops accepting it within seconds."""
    from .tokens import revoke_token

    _with_database(settings, lambda db: revoke_token(db, name, Subject.local()))
    click.echo(f"revoked {name}")


# -- import on the cache host ---------------------------------------------------


@main.command("import")
@_host_options(with_listen=False)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Logical model name, e.g. llama3.")
@click.option("--version", "version", required=True, help="Version or tag, e.g. 8b-q4_0.")
@click.option("--vendor", default=None, help="Vendor, e.g. meta.")
@click.option("--type", "artifact_type", default=None, type=click.Choice(["gguf", "safetensors", "ollama"]),
              help="Artifact type; read from the content when absent.")
@click.option("--move", is_flag=True, help="Move the file into the store (a rename: no second copy).")
def import_(settings: Settings, path: Path, model: str, version: str, vendor: str | None,
            artifact_type: str | None, move: bool) -> None:
    """Import a file (or a folder, for a multi-file artifact) and print its digest on the last line."""
    from .importer import ImportRequest, import_path
    from .store import BlobStore

    request = ImportRequest.parse(path, model, version, vendor, artifact_type, move)
    store = BlobStore(settings.data_dir)

    async def work(db):
        await asyncio.to_thread(store.prepare)
        return await import_path(db, store, request, Subject.local())

    result = _with_database(settings, work)
    state = "new" if result.created else "already present"
    click.echo(f"{request.model_label} {result.artifact_type} {result.size} bytes, {result.state} ({state})",
               err=True)
    click.echo(str(result.digest))
