"""Admin verbs: each one calls the management API (``--url``/``--token``, or the env)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import InvalidInput, ModelcacheError, NotFound
from ..formats import ARTIFACT_TYPES
from . import _Group, _progress_bar, main

# -- admin verbs: they talk to the management API --------------------------------


def _api_options(fn: Callable) -> Callable:
    @click.option("--url", default=None, help="modelcache URL (env MODELCACHE_URL; default http://127.0.0.1:12085).")
    @click.option("--token", default=None, help="API token (env MODELCACHE_TOKEN).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
    @functools.wraps(fn)
    def wrapper(url: str | None, token: str | None, as_json: bool, **kwargs: Any) -> Any:
        from ..client import Client

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


@prefs.command("history")
@_api_options
@click.option("--limit", default=50, show_default=True)
@click.option("--cursor", default=None)
def prefs_history(client, limit: int, cursor: str | None):
    """Changes of the preferences, newest first: from, to, who, when, why (admin, operator)."""
    body = client.call("GET", "/v1/preferences/history", query={"limit": limit, "cursor": cursor})
    for c in body["changes"]:
        c["from"], c["to"] = json.dumps(c["old_value"]), json.dumps(c["new_value"])
    table = _table(body["changes"], [("AT", "changed_at"), ("KEY", "key"), ("FROM", "from"), ("TO", "to"),
                                     ("BY", "changed_by"), ("REASON", "reason")])
    if body["next_cursor"]:
        table += f"\nmore: --cursor {body['next_cursor']}"
    return body, table


@main.command()
@_api_options
def tokens(client):
    """List every token, revoked ones too, oldest first (never their secrets)."""
    body = client.every("/v1/tokens", "tokens")
    return body, _table(body["tokens"], [("NAME", "name"), ("ROLE", "role"), ("NODE", "node_id"),
                                         ("EXPIRES", "expires_at"), ("REVOKED", "revoked_at")])


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
@click.option("--type", "artifact_type", default=None, type=click.Choice(ARTIFACT_TYPES))
@click.option("--sha256", "expected", default=None, help="Expected digest (sha256:<hex>); a mismatch keeps nothing.")
def upload(client, path: Path, model, version, vendor, artifact_type, expected):
    """Stream a file to the server (POST /v1/imports) with a progress bar."""
    with _progress_bar(path.name, path.stat().st_size) as bar:
        body = client.upload(path, {"model": model, "version": version, "vendor": vendor, "type": artifact_type,
                                    "sha256": expected, "filename": path.name}, bar.update)
    return body, _table(_labelled([body]), _ARTIFACT_COLUMNS) + f"\n{body['digest']}"


# -- downloads ------------------------------------------------------------------

_DOWNLOAD_COLUMNS = [("ID", "id"), ("STATE", "state"), ("SOURCE", "source"), ("REFERENCE", "reference"),
                     ("MODEL", "label"), ("BYTES", "bytes_done"), ("OF", "bytes_total"), ("BY", "requested_by"),
                     ("ERROR", "problem")]
_ENDED = ("completed", "failed", "rejected", "cancelled")


def _download_rows(downloads: list[dict]) -> list[dict]:
    for d in downloads:
        name = f"{d['vendor']}/{d['model']}" if d["vendor"] else d["model"]
        d["label"] = f"{name}:{d['version']}"
        d["problem"] = d["error"] or d["reason"]
    return downloads


@main.command()
@_api_options
@click.argument("source")
@click.argument("reference")
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--vendor", default=None)
@click.option("--type", "artifact_type", default=None, type=click.Choice(ARTIFACT_TYPES))
@click.option("--sha256", "expected", default=None, help="Expected digest (sha256:<hex>); a mismatch keeps nothing.")
@click.option("--no-wait", is_flag=True, help="Print the download's id at once instead of following it.")
def download(client, source, reference, model, version, vendor, artifact_type, expected, no_wait):
    """Ask the cache to download REFERENCE from SOURCE, and follow it with a progress bar."""
    body = client.call("POST", "/v1/downloads", body={
        "source": source, "reference": reference, "model": model, "version": version, "vendor": vendor,
        "artifact_type": artifact_type, "sha256": expected})
    if no_wait:
        return body, body["id"]
    body = _follow(client, body)
    if body["state"] != "completed":
        why = body["error"] or body["reason"] or "no reason given"
        raise ModelcacheError(f"download {body['id']} {body['state']}: {why}")
    return body, _table(_download_rows([body]), _DOWNLOAD_COLUMNS) + f"\n{body['digest']}"


def _follow(client, body: dict) -> dict:
    """Poll a download until it ends, drawing its bytes on a bar (stderr, terminals only)."""
    import time

    told_pending = False
    with _progress_bar(body["reference"].rsplit("/", 1)[-1], body["bytes_total"]) as bar:
        while body["state"] not in _ENDED:
            if body["state"] == "pending_approval" and not told_pending:
                click.echo(f"download {body['id']} waits for an admin's approval: modelcache approve {body['id']}",
                           err=True)
                told_pending = True
            time.sleep(0.5)
            body = client.call("GET", f"/v1/downloads/{body['id']}")
            if body["bytes_total"] is not None and bar.total != body["bytes_total"]:
                bar.total = body["bytes_total"]
            bar.update(body["bytes_done"] - bar.n)  # backwards too, when a changed upstream restarts it
    return body


@main.command()
@_api_options
@click.option("--state", default=None, help="pending_approval, queued, running, completed, failed, rejected, cancelled")
@click.option("--source", default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--cursor", default=None)
def downloads(client, state, source, limit, cursor):
    """List downloads, newest first."""
    body = client.call("GET", "/v1/downloads", query={"state": state, "source": source, "limit": limit,
                                                      "cursor": cursor})
    table = _table(_download_rows(body["downloads"]), _DOWNLOAD_COLUMNS)
    if body["next_cursor"]:
        table += f"\nmore: --cursor {body['next_cursor']}"
    return body, table


@main.command()
@_api_options
@click.argument("download_id")
def approve(client, download_id: str):
    """Approve a pending download (someone else's)."""
    body = client.call("POST", f"/v1/downloads/{download_id}/approve")
    return body, _table(_download_rows([body]), _DOWNLOAD_COLUMNS)


@main.command()
@_api_options
@click.argument("download_id")
@click.option("--reason", required=True, help="Why: kept in the audit log and shown to the requester.")
def reject(client, download_id: str, reason: str):
    """Reject a pending download."""
    body = client.call("POST", f"/v1/downloads/{download_id}/reject", body={"reason": reason})
    return body, _table(_download_rows([body]), _DOWNLOAD_COLUMNS)


@main.command()
@_api_options
@click.argument("download_id")
def cancel(client, download_id: str):
    """Cancel a download that has not ended (a running transfer stops and its partial file is removed)."""
    body = client.call("POST", f"/v1/downloads/{download_id}/cancel")
    return body, _table(_download_rows([body]), _DOWNLOAD_COLUMNS)
