"""Verbs that act on the cache host itself (its database and store): db, token, import."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ..auth import Role, Subject
from ..config import Settings
from ..formats import ARTIFACT_TYPES
from . import _Group, _host_options, _progress_bar, _with_database, main

# -- bootstrap verbs on the database --------------------------------------------


@main.group(cls=_Group)
def db() -> None:
    """Schema migrations."""


@db.command("migrate")
@_host_options()
def db_migrate(settings: Settings) -> None:
    """Bring the database schema up to date."""
    from ..db import audit
    from ..db.migrate import migrate

    async def work(db):
        applied = await migrate(db)
        async with db.connection() as conn:
            await audit.audit(conn, Subject.local(), "schema.migrate", "schema", None,
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
@_host_options()
def db_status(settings: Settings) -> None:
    """Show the schema version of the database and of this modelcache."""
    from ..db.migrate import status

    state = _with_database(settings, status, migrate_first=False)
    current = "empty" if state.current is None else str(state.current)
    click.echo(f"database: {current}; code: {state.latest}; pending: {len(state.pending)}")
    for m in state.pending:
        click.echo(f"pending {m.version:04d}_{m.name}")


@main.group(cls=_Group)
def token() -> None:
    """API tokens (bootstrap: acts on the database directly)."""


@token.command("create")
@_host_options()
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
@click.option("--name", required=True, help="A unique name, shown in logs and the audit log.")
@click.option("--node-id", default=None, help="The node's UUID, for node tokens.")
@click.option("--expires-in", default=None, help="Lifetime such as 12h or 30d; default: no expiry.")
def token_create(settings: Settings, role: str, name: str, node_id: str | None, expires_in: str | None) -> None:
    """Mint a token and print its secret on the last line."""
    from ..tokens import create_token, parse_duration, parse_node_id

    lifetime = parse_duration(expires_in) if expires_in else None
    node = parse_node_id(node_id)
    secret, row = _with_database(settings, lambda db: create_token(
        db, name=name, role=Role.parse(role), subject=Subject.local(), node_id=node, expires_in=lifetime))
    expiry = row["expires_at"].isoformat() if row["expires_at"] else "never"
    click.echo(f"token {row['name']} (role {row['role']}, expires {expiry}); the secret is shown once:", err=True)
    click.echo(secret)


@token.command("list")
@_host_options()
def token_list(settings: Settings) -> None:
    """List tokens (never their secrets)."""
    from ..tokens import all_tokens

    rows = _with_database(settings, all_tokens)
    click.echo(f"{'NAME':24} {'ROLE':8} {'EXPIRES':25} REVOKED")
    for r in rows:
        expires = r["expires_at"].isoformat(timespec="seconds") if r["expires_at"] else "-"
        revoked = r["revoked_at"].isoformat(timespec="seconds") if r["revoked_at"] else "-"
        click.echo(f"{r['name']:24} {r['role']:8} {expires:25} {revoked}")


@token.command("revoke")
@_host_options()
@click.argument("name")
def token_revoke(settings: Settings, name: str) -> None:
    """Revoke a token by name; a running server stops accepting it within seconds."""
    from ..tokens import revoke_token

    _with_database(settings, lambda db: revoke_token(db, name, Subject.local()))
    click.echo(f"revoked {name}")


# -- import on the cache host ---------------------------------------------------


@main.command("import")
@_host_options()
@click.argument("path")
@click.option("--model", default=None, help="Logical model name, e.g. llama3.")
@click.option("--version", "version", default=None, help="Version or tag, e.g. 8b-q4_0.")
@click.option("--vendor", default=None, help="Vendor, e.g. meta.")
@click.option("--type", "artifact_type", default=None, type=click.Choice(ARTIFACT_TYPES),
              help="Artifact type; read from the content when absent.")
@click.option("--move", is_flag=True, help="Move the file into the store (a rename: no second copy).")
@click.option("--ollama-models", "ollama_models", type=click.Path(path_type=Path), default=None,
              help="An Ollama models directory (e.g. ~/.ollama/models); PATH is then the model's NAME:TAG, "
                   "and --model/--version/--vendor default to its model, tag and namespace.")
def import_(settings: Settings, path: str, model: str | None, version: str | None, vendor: str | None,
            artifact_type: str | None, move: bool, ollama_models: Path | None) -> None:
    """Import a file (or a folder, for a multi-file artifact) and print its digest on the last line.

    With --ollama-models DIR, import the Ollama model PATH (NAME:TAG, e.g. llama3:8b) from DIR.
    On a terminal, a bar shows the bytes hashed so far.
    """
    from ..imports import ImportRequest, import_ollama_model, import_path
    from ..formats.ollama import ModelName
    from ..store import BlobStore

    if ollama_models is not None:
        if artifact_type not in (None, "ollama") or move:
            raise click.UsageError("--ollama-models imports an ollama artifact by copying; drop --type and --move")
        name, request = ModelName.parse(path), None
    else:
        for option, value in (("--model", model), ("--version", version)):
            if value is None:
                raise click.UsageError(f"Missing option '{option}'.")
        request = ImportRequest.parse(Path(path), model, version, vendor, artifact_type, move, inspect=True)
    store = BlobStore(settings.data_dir)
    bar = _HashingBar(Path(path).name if request is not None else str(name))

    async def work(db):
        await asyncio.to_thread(store.prepare)
        if request is None:
            return await import_ollama_model(db, store, ollama_models, name, Subject.local(), model=model,
                                             version=version, vendor=vendor, progress=bar)
        return await import_path(db, store, request, Subject.local(), progress=bar)

    try:
        result = _with_database(settings, work)
    finally:
        bar.close()
    state = "new" if result.created else "already present"
    label = request.model_label if request is not None else str(name)
    click.echo(f"{label} {result.artifact_type} {result.size} bytes, {result.state} ({state})", err=True)
    click.echo(str(result.digest))


class _HashingBar:
    """An import's bar: drawn from the first bytes hashed (not while the database starts), closed at the last."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int | None) -> None:  # from the hashing thread
        if self.bar is None:
            self.bar = _progress_bar(self.desc, total)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.close()  # before the log line that says it is imported

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
