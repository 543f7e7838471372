"""Node verbs over the management API: register nodes, list them, select, ask for loads, place versions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidInput
from . import main
from .admin import _api_options, _table

_NODE_COLUMNS = [("NAME", "name"), ("ID", "id"), ("STATUS", "status"), ("LABELS", "labels_shown"),
                 ("RUNTIMES", "runtimes_shown"), ("MODELS", "available_models"), ("LAST SEEN", "last_seen_at")]
_LOAD_COLUMNS = [("LOAD", "id"), ("NODE", "node_id"), ("MODEL", "label"), ("STATE", "state"), ("DIGEST", "digest"),
                 ("ERROR", "error")]
_PLACEMENT_COLUMNS = [("ID", "id"), ("SELECTOR", "selector_shown"), ("VERSIONS", "versions_shown"),
                      ("MATCHING", "nodes_matching"), ("READY", "nodes_ready"), ("STALE", "nodes_stale")]


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for text in values:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise InvalidInput(f"invalid {what} {text!r}: expected key=value")
        out[key] = value
    return out


def _shown(pairs: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pairs.items())) or "-"


def _nodes(rows: list[dict]) -> list[dict]:
    for n in rows:
        n["labels_shown"] = _shown(n["labels"])
        n["runtimes_shown"] = ",".join(n["facts"].get("runtimes") or []) or "-"
    return rows


def _loads(rows: list[dict]) -> list[dict]:
    for x in rows:
        name = f"{x['vendor']}/{x['model']}" if x["vendor"] else x["model"]
        x["label"] = f"{name}:{x['version']}"
        x["digest"] = (x.get("artifact") or {}).get("digest")
    return rows


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_node_config(path: Path, config: dict, runtimes: list[str]) -> None:
    """The file ``modelcache node --config`` reads: readable by its owner only (it holds the token)."""
    lines = ["# modelcache node config, written by `modelcache node-register`. It holds the node's token.",
             f"cache_url = {_toml_value(config['cache_url'])}", f"node_id = {_toml_value(config['node_id'])}",
             f"token = {_toml_value(config['token'])}", f"token_name = {_toml_value(config['token_name'])}",
             f"runtimes = {_toml_value(runtimes)}", "", "[pull]",
             f"parallel_parts = {config['pull']['parallel_parts']}", f"part_bytes = {config['pull']['part_bytes']}", ""]
    _write_private(path, "\n".join(lines))


def write_runtime_env(path: Path, env: dict[str, str]) -> None:
    """``KEY=value`` lines, as systemd's EnvironmentFile=, ``docker run --env-file`` and ``set -a; . FILE``
    read them (no quotes: the values are a URL and a token); for its owner only, as it holds the token."""
    _write_private(path, "# modelcache runtime environment, written by `modelcache node-register`.\n"
                   + "".join(f"{key}={value}\n" for key, value in env.items()))


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@main.command()
@_api_options
@click.option("--limit", default=100, show_default=True)
@click.option("--cursor", default=None)
def nodes(client, limit: int, cursor: str | None):
    """List registered nodes: status (ready or stale), labels, runtimes, models available."""
    body = client.call("GET", "/v1/nodes", query={"limit": limit, "cursor": cursor})
    table = _table(_nodes(body["nodes"]), _NODE_COLUMNS)
    if body["next_cursor"]:
        table += f"\nmore: --cursor {body['next_cursor']}"
    return body, table


@main.command("node-register")
@_api_options
@click.argument("name")
@click.option("--id", "node_id", default=None, help="The node's id (a UUID); registering it again re-mints its token.")
@click.option("--label", "labels", multiple=True, help="key=value, repeatable (placements select on labels).")
@click.option("--runtime", "runtimes", multiple=True, help="ollama, hf or files; repeatable.")
@click.option("--gpu-memory-bytes", type=int, default=None)
@click.option("--free-disk-bytes", type=int, default=None)
@click.option("--config-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the node's config (cache_url, node_id, token, runtimes) for `modelcache node --config`.")
@click.option("--env-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the environment (HF_ENDPOINT, HF_TOKEN) that points the node's runtimes at the cache.")
def node_register(client, name, node_id, labels, runtimes, gpu_memory_bytes, free_disk_bytes, config_out, env_out):
    """Register a node; prints its config (the token is shown once) or writes it with --config-out, and
    with --env-out the environment for its model runtimes."""
    facts: dict[str, Any] = {"runtimes": list(runtimes), "gpu_memory_bytes": gpu_memory_bytes,
                             "free_disk_bytes": free_disk_bytes}
    body = client.call("POST", "/v1/nodes", body={"id": node_id, "name": name, "labels": _pairs(labels, "label"),
                                                  "facts": facts} if node_id else
                       {"name": name, "labels": _pairs(labels, "label"), "facts": facts})
    config = body["config"]
    table = _table(_nodes([body["node"]]), _NODE_COLUMNS)
    if env_out is not None:
        write_runtime_env(env_out, config["runtime_env"])
        table += f"\nruntime environment written to {env_out}: give it to the node's model runtimes"
    if config_out is not None:
        write_node_config(config_out, config, list(runtimes))
        table += f"\nconfig written to {config_out}: run `modelcache node --config {config_out}` on the node"
    else:
        table += (f"\ncache_url = {config['cache_url']}\nnode_id = {config['node_id']}\n"
                  f"token (shown once) = {config['token']}")
    return body, table


@main.command()
@_api_options
@click.option("--model", default=None, help="[vendor/]name")
@click.option("--version", "version", default=None)
@click.option("--min-context-length", type=int, default=None)
@click.option("--tool-use", is_flag=True, default=None)
@click.option("--vision", is_flag=True, default=None)
@click.option("--json-mode", is_flag=True, default=None)
@click.option("--gpu-required", is_flag=True, default=None)
@click.option("--language", "languages", multiple=True)
@click.option("--node", "node_ids", multiple=True, help="A candidate node id; repeatable (default: every node).")
def select(client, model, version, min_context_length, tool_use, vision, json_mode, gpu_required, languages,
           node_ids):
    """Choose a model version and a node for capability requirements: use it there, or load it first."""
    requirements = {"min_context_length": min_context_length, "tool_use": tool_use, "vision": vision,
                    "json_mode": json_mode, "gpu_required": gpu_required, "language": list(languages) or None}
    # a flag not given says nothing (not "must be false")
    request: dict[str, Any] = {"requirements": {k: v for k, v in requirements.items() if v not in (None, False)}}
    if model:
        request["model"] = model
    if version:
        request["version"] = version
    if node_ids:
        request["nodes"] = list(node_ids)
    body = client.call("POST", "/v1/select", body=request)
    v, a, n = body["version"], body["artifact"], body["node"]
    name = f"{v['vendor']}/{v['model']}" if v["vendor"] else v["model"]
    lines = [f"{body['action']} {name}:{v['version']} on node {n['name']} ({n['id']})",
             f"artifact {a['digest']} ({a['artifact_type']}, {a['size_bytes']} bytes)"]
    if body["load_request"]:
        lines.append(f"load request {body['load_request']['id']} ({body['load_request']['state']})")
    lines.append(f"curl: {body['pull']['curl']}")
    if body["pull"]["ollama"]:
        lines.append(f"ollama pull --insecure {body['pull']['ollama']}")
    if body["pull"]["hf"]:
        hf = body["pull"]["hf"]
        lines.append(f"HF_ENDPOINT={hf['endpoint']} repo {hf['repo']} revision {hf['revision']}")
    lines += [f"- {r}" for r in body["reasons"]]
    return body, "\n".join(lines)


@main.command()
@_api_options
@click.argument("node_id")
@click.argument("version_id")
def load(client, node_id: str, version_id: str):
    """Ask NODE_ID to load model version VERSION_ID (an open request for it is shown instead)."""
    body = client.call("POST", f"/v1/nodes/{node_id}/loads", body={"model_version_id": version_id})
    return body, _table(_loads([body]), _LOAD_COLUMNS)


@main.command()
@_api_options
def placements(client):
    """List placements, with how many matching nodes are ready."""
    body = client.every("/v1/placements", "placements")
    for p in body["placements"]:
        p["selector_shown"] = _shown(p["selector"])
        p["versions_shown"] = ",".join(p["resolved_version_ids"]) or "-"
    return body, _table(body["placements"], _PLACEMENT_COLUMNS)


@main.command()
@_api_options
@click.option("--selector", "selector", multiple=True, help="label=value a node must carry; repeatable.")
@click.option("--version", "version_ids", multiple=True, help="A model version id; repeatable.")
@click.option("--min-context-length", type=int, default=None, help="Instead of --version: the newest promoted "
              "version with at least this context length.")
def place(client, selector, version_ids, min_context_length):
    """Declare that nodes with these labels hold these versions: load requests follow, now and as nodes join."""
    request: dict[str, Any] = {"selector": _pairs(selector, "selector")}
    if version_ids:
        request["model_version_ids"] = list(version_ids)
    if min_context_length is not None:
        request["requirements"] = {"min_context_length": min_context_length}
    body = client.call("POST", "/v1/placements", body=request)
    body["selector_shown"] = _shown(body["selector"])
    body["versions_shown"] = ",".join(body["resolved_version_ids"]) or "-"
    table = _table([body], _PLACEMENT_COLUMNS)
    if body["load_requests"]:
        table += "\n" + _table(_loads(body["load_requests"]), _LOAD_COLUMNS)
    return body, table
