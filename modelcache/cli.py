"""The ``modelcache`` command: a thin click layer over library functions.

Option defaults are ``None`` so the real defaults live only in config.py.
Errors become exit codes in one place, :class:`_Group.invoke`: 1 for a
failed operation, 2 for bad usage or a bad value, with one line on stderr.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import logs
from .auth import Role, Subject
from .config import Settings, load
from .errors import ConfigError, InvalidInput, ModelcacheError, NotFound

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
@click.argument("path")
@click.option("--model", default=None, help="Logical model name, e.g. llama3.")
@click.option("--version", "version", default=None, help="Version or tag, e.g. 8b-q4_0.")
@click.option("--vendor", default=None, help="Vendor, e.g. meta.")
@click.option("--type", "artifact_type", default=None, type=click.Choice(["gguf", "safetensors", "ollama"]),
              help="Artifact type; read from the content when absent.")
@click.option("--move", is_flag=True, help="Move the file into the store (a rename: no second copy).")
@click.option("--ollama-models", "ollama_models", type=click.Path(path_type=Path), default=None,
              help="An Ollama models directory (e.g. ~/.ollama/models); PATH is then the model's NAME:TAG, "
                   "and --model/--version/--vendor default to its model, tag and namespace.")
def import_(settings: Settings, path: str, model: str | None, version: str | None, vendor: str | None,
            artifact_type: str | None, move: bool, ollama_models: Path | None) -> None:
    """Import a file (or a folder, for a multi-file artifact) and print its digest on the last line.

    With --ollama-models DIR, import the Ollama model PATH (NAME:TAG, e.g. llama3:8b) from DIR.
    """
    from .importer import ImportRequest, import_ollama_model, import_path
    from .ollama import ModelName
    from .store import BlobStore

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

    async def work(db):
        await asyncio.to_thread(store.prepare)
        if request is None:
            return await import_ollama_model(db, store, ollama_models, name, Subject.local(), model=model,
                                             version=version, vendor=vendor)
        return await import_path(db, store, request, Subject.local())

    result = _with_database(settings, work)
    state = "new" if result.created else "already present"
    label = request.model_label if request is not None else str(name)
    click.echo(f"{label} {result.artifact_type} {result.size} bytes, {result.state} ({state})", err=True)
    click.echo(str(result.digest))


# -- admin verbs: they talk to the management API --------------------------------


def _api_options(fn: Callable) -> Callable:
    @click.option("--url", default=None, help="modelcache URL (env MODELCACHE_URL; default http://127.0.0.1:12085).")
    @click.option("--token", default=None, help="API token (env MODELCACHE_TOKEN).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
    @functools.wraps(fn)
    def wrapper(url: str | None, token: str | None, as_json: bool, **kwargs: Any) -> Any:
        from .client import Client

        result = fn(Client(url, token), **kwargs)
        if result is None:
            return
        data, table = result
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            click.echo(table)

    return wrapper


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain aligned table: columns are (header, key)."""
    cells = [[h for h, _ in columns]] + [[_cell(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return str(value)


_ARTIFACT_COLUMNS = [("DIGEST", "digest"), ("MODEL", "label"), ("TYPE", "artifact_type"), ("SIZE", "size_bytes"),
                     ("STATE", "state"), ("PINNED", "pinned"), ("LAST PULL", "last_accessed_at")]


def _labelled(artifacts: list[dict]) -> list[dict]:
    for a in artifacts:
        name = f"{a['vendor']}/{a['model']}" if a["vendor"] else a["model"]
        a["label"] = f"{name}:{a['version']}"
    return artifacts


@main.command()
@_api_options
@click.option("--name", default=None)
@click.option("--vendor", default=None)
@click.option("--limit", default=100, show_default=True)
def models(client, name: str | None, vendor: str | None, limit: int):
    """List models."""
    body = client.call("GET", "/v1/models", query={"name": name, "vendor": vendor, "limit": limit})
    return body, _table(body["models"], [("NAME", "name"), ("VENDOR", "vendor"), ("ID", "id"),
                                         ("UPDATED", "updated_at")])


@main.command()
@_api_options
@click.option("--model", default=None)
@click.option("--version", "version", default=None)
@click.option("--type", "artifact_type", default=None)
@click.option("--state", default=None)
@click.option("--limit", default=100, show_default=True)
def artifacts(client, model, version, artifact_type, state, limit):
    """List artifacts."""
    body = client.call("GET", "/v1/artifacts", query={"model": model, "version": version, "type": artifact_type,
                                                      "state": state, "limit": limit})
    return body, _table(_labelled(body["artifacts"]), _ARTIFACT_COLUMNS)


def _artifact_action(action: str, doc: str) -> None:
    @main.command(action, help=doc)
    @_api_options
    @click.argument("artifact")
    def command(client, artifact: str):
        body = client.call("POST", f"/v1/artifacts/{artifact}/{action}")
        shown = body.get("artifact", body)
        table = _table(_labelled([shown]), _ARTIFACT_COLUMNS)
        if action == "evict":
            table += f"\nfreed {body['freed_bytes']} bytes"
        if action == "verify" and not body["ok"]:
            click.echo(_table(body["blobs"], [("BLOB", "digest"), ("OK", "ok"), ("REASON", "reason")]), err=True)
            raise ModelcacheError(f"artifact {artifact} failed verification and was quarantined")
        return body, table


_artifact_action("promote", "Promote an artifact (by id or sha256:<hex>): nodes may pull it.")
_artifact_action("pin", "Pin an artifact: eviction never removes it.")
_artifact_action("unpin", "Unpin an artifact.")
_artifact_action("evict", "Evict an artifact's bytes (its registry row stays, state evicted).")


@main.command()
@_api_options
@click.argument("artifact", required=False)
@click.option("--all", "everything", is_flag=True, help="Re-hash every blob in the store.")
def verify(client, artifact: str | None, everything: bool):
    """Re-hash an artifact's blobs (or --all); mismatches are quarantined."""
    if bool(artifact) == everything:
        raise InvalidInput("give an artifact (id or sha256:<hex>) or --all, not both")
    if everything:
        body = client.call("POST", "/v1/scrub")
        table = _table(body["blobs"], [("BLOB", "digest"), ("OK", "ok"), ("REASON", "reason")])
        if not body["ok"]:
            click.echo(table)
            raise ModelcacheError(f"{sum(not b['ok'] for b in body['blobs'])} blobs failed and were quarantined")
        return body, f"{len(body['blobs'])} blobs verified"
    body = client.call("POST", f"/v1/artifacts/{artifact}/verify")
    table = _table(body["blobs"], [("BLOB", "digest"), ("OK", "ok"), ("REASON", "reason")])
    if not body["ok"]:
        click.echo(table)
        raise ModelcacheError(f"artifact {artifact} failed verification and was quarantined")
    return body, table


@main.group(cls=_Group)
def prefs() -> None:
    """Policy preferences."""


@prefs.command("get")
@_api_options
@click.argument("key", required=False)
def prefs_get(client, key: str | None):
    """Show the effective preferences (or one)."""
    body = client.call("GET", "/v1/preferences")
    rows = [p for p in body["preferences"] if key in (None, p["key"])]
    if key and not rows:
        raise NotFound(f"unknown preference {key!r}")
    for p in rows:
        p["shown"] = json.dumps(p["value"])
    return rows if key is None else rows[0], _table(rows, [("KEY", "key"), ("VALUE", "shown"), ("VERSION", "version"),
                                                          ("BY", "updated_by"), ("AT", "updated_at")])


@prefs.command("set")
@_api_options
@click.argument("key")
@click.argument("value")
@click.option("--expected-version", type=int, default=None, help="Fail if someone changed it since.")
@click.option("--reason", default=None, help="Why: kept in the audit log.")
def prefs_set(client, key: str, value: str, expected_version: int | None, reason: str | None):
    """Set a preference; VALUE is JSON (10737418240, "lru", true, ["huggingface"])."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value  # a bare word is a string
    body = client.call("PUT", f"/v1/preferences/{key}",
                       body={"value": parsed, "expected_version": expected_version, "reason": reason})
    return body, f"{body['key']} = {json.dumps(body['value'])} (version {body['version']})"


@main.command()
@_api_options
@click.option("--action", default=None)
@click.option("--subject", default=None)
@click.option("--resource", default=None)
@click.option("--since", default=None)
@click.option("--until", default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--cursor", default=None)
def audit(client, action, subject, resource, since, until, limit, cursor):
    """The audit log, newest first."""
    body = client.call("GET", "/v1/audit", query={"action": action, "subject": subject, "resource": resource,
                                                  "since": since, "until": until, "limit": limit, "cursor": cursor})
    for e in body["events"]:
        e["who"] = f"{e['subject_type']}:{e['subject_id']}" if e["subject_id"] else e["subject_type"]
    table = _table(body["events"], [("AT", "created_at"), ("WHO", "who"), ("ACTION", "action"),
                                    ("RESOURCE", "resource"), ("DECISION", "decision"), ("OUTCOME", "outcome"),
                                    ("REASON", "reason")])
    if body["next_cursor"]:
        table += f"\nmore: --cursor {body['next_cursor']}"
    return body, table


@main.command()
@_api_options
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--vendor", default=None)
@click.option("--type", "artifact_type", default=None, type=click.Choice(["gguf", "safetensors", "ollama"]))
@click.option("--sha256", "expected", default=None, help="Expected digest (sha256:<hex>); a mismatch keeps nothing.")
def upload(client, path: Path, model, version, vendor, artifact_type, expected):
    """Stream a file to the server (POST /v1/imports) with a progress bar."""
    from tqdm import tqdm

    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
              file=sys.stderr, disable=None) as bar:
        body = client.upload(path, {"model": model, "version": version, "vendor": vendor, "type": artifact_type,
                                    "sha256": expected}, bar.update)
    return body, _table(_labelled([body]), _ARTIFACT_COLUMNS) + f"\n{body['digest']}"
