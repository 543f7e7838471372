"""Models and artifacts: search and filters, sizes, states, last pull, capabilities, pull instructions, and
the actions promote, pin, unpin, evict and verify, each confirmed on a page of its own before it is posted.

Every read and every action is ``ui.invoke`` of the ``/v1`` endpoint the API and the CLI use.
"""

from __future__ import annotations

import shlex
import uuid
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDictProxy

from ...errors import InvalidInput
from ...nodes.selection import artifact_pull
from ..urls import public_base
from ..v1 import registry
from .pages import Ui, form, local_target, page, see_other

ACTIONS = {  # what the page offers → the /v1 endpoint it runs
    "promote": registry.promote,
    "pin": registry.pin,
    "unpin": registry.unpin,
    "evict": registry.evict,
    "verify": registry.verify,
}
WARNINGS = {
    "promote": "Nodes will be able to pull it at once.",
    "pin": "It will never be evicted to make room.",
    "unpin": "It may be evicted to make room, by the eviction policy.",
    "evict": "Its bytes are removed from the store (blobs no other artifact holds); the registry keeps the row. "
             "Pulls of it fail until it is imported or downloaded again.",
    "verify": "Every blob is read and hashed again; a mismatch is quarantined and no longer served.",
}
TYPES = ("gguf", "safetensors", "ollama")
STATES = ("staged", "promoted", "evicted", "quarantined")
PAGE = 50
TEXT_SEARCH_PAGES = 10  # a text search reads at most this many pages of the filtered list


def offered(artifact: registry.ArtifactOut) -> list[str]:
    """The actions that make sense for an artifact in its state (the role is checked separately)."""
    out = []
    if artifact.state == "staged":
        out.append("promote")
    if artifact.state in ("staged", "promoted"):
        out.append("unpin" if artifact.pinned else "pin")
        out += ["verify", "evict"]
    return out


def _matches(artifact: registry.ArtifactOut, text: str) -> bool:
    words = f"{artifact.vendor or ''}/{artifact.model}:{artifact.version} {artifact.digest} {artifact.source_uri or ''}"
    return all(word in words.lower() for word in text.lower().split())


@page("/ui/models", "models.html")
async def models(request: web.Request, ui: Ui) -> dict[str, Any]:
    q = request.query
    filters = {"type": q.get("type", ""), "state": q.get("state", ""), "q": q.get("q", "").strip()}
    query: dict[str, Any] = {"limit": str(PAGE)}
    if filters["type"] in TYPES:
        query["type"] = filters["type"]
    if filters["state"] in STATES:
        query["state"] = filters["state"]
    cursor = q.get("cursor") or None
    found: list[registry.ArtifactOut] = []
    for _ in range(TEXT_SEARCH_PAGES if filters["q"] else 1):
        result: registry.ArtifactPage = await ui.invoke(registry.list_artifacts,
                                                        query={**query, **({"cursor": cursor} if cursor else {})})
        found += [a for a in result.artifacts if not filters["q"] or _matches(a, filters["q"])]
        cursor = result.next_cursor
        if cursor is None or len(found) >= PAGE:
            break
    capabilities = await _capabilities(ui, {a.model_version_id for a in found})
    next_page = urlencode({**{k: v for k, v in filters.items() if v}, "cursor": cursor}) if cursor else None
    return {"artifacts": found, "filters": filters, "types": TYPES, "states": STATES, "next_page": next_page,
            "capabilities": capabilities, "offered": offered, "actions": ACTIONS, "path_qs": request.path_qs}


async def _capabilities(ui: Ui, version_ids: set[uuid.UUID]) -> dict[uuid.UUID, dict]:
    out = {}
    for version_id in version_ids:
        version: registry.VersionOut = await ui.invoke(registry.get_version, params={"version_id": str(version_id)})
        out[version_id] = version.capabilities
    return out


@page("/ui/models/{artifact}", "artifact.html")
async def artifact(request: web.Request, ui: Ui) -> dict[str, Any]:
    found: registry.ArtifactOut = await ui.invoke(registry.get_artifact,
                                                  params={"artifact": request.match_info["artifact"]})
    version: registry.VersionOut = await ui.invoke(registry.get_version,
                                                   params={"version_id": str(found.model_version_id)})
    return {"a": found, "version": version, "pull": pull_commands(request, found), "offered": offered,
            "actions": ACTIONS}


def pull_commands(request: web.Request, a: registry.ArtifactOut) -> list[tuple[str, str]]:
    """(label, command) pairs to copy, from the one rule the selection API uses (selection.artifact_pull)."""
    hints = artifact_pull(a.vendor, a.model, a.version, a.digest.removeprefix("sha256:"), a.artifact_type,
                          public_base(request))
    out = [("curl", hints["curl"])]
    if hints["ollama"]:
        out.append(("ollama", f"ollama pull --insecure {hints['ollama']}"))
    if hints["hf"]:
        hf = hints["hf"]
        out.append(("huggingface_hub", f"HF_ENDPOINT={shlex.quote(hf['endpoint'])} hf download "
                                       f"{shlex.quote(hf['repo'])} --revision {shlex.quote(hf['revision'])}"))
    return out


def _action(name: str | None) -> str:
    if name not in ACTIONS:
        raise InvalidInput(f"unknown action {name!r}: expected one of {', '.join(ACTIONS)}")
    return name


def _back(value: Any) -> str:
    return local_target(value, "/ui/models", "/ui/models")


@page("/ui/models/{artifact}/{action}", "confirm.html")
async def confirm(request: web.Request, ui: Ui) -> dict[str, Any]:
    """The confirmation step: what the action will do, and the one button that does it (a POST)."""
    action = _action(request.match_info["action"])
    found: registry.ArtifactOut = await ui.invoke(registry.get_artifact,
                                                  params={"artifact": request.match_info["artifact"]})
    return {"a": found, "action": action, "warning": WARNINGS[action], "allowed": ui.may(ACTIONS[action]),
            "back": _back(request.query.get("back"))}


@form("/ui/models/{artifact}/{action}")
async def act(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    """Run the confirmed action through its /v1 endpoint (role check, audit and all) and say what it did."""
    action = _action(request.match_info["action"])
    result = await ui.invoke(ACTIONS[action], params={"artifact": request.match_info["artifact"]})
    ui.tell(_said(action, result))
    return see_other(_back(data.get("back")))


def _said(action: str, result: Any) -> str:
    if action == "evict":
        a = result.artifact
        return f"Evicted {a.model}:{a.version} ({a.digest}): {len(result.removed_blobs)} blobs, " \
               f"{result.freed_bytes} bytes freed."
    if action == "verify":
        a = result.artifact
        bad = [b for b in result.blobs if not b.ok]
        if not bad:
            return f"Verified {a.model}:{a.version}: all {len(result.blobs)} blobs match their digests."
        return f"Verify {a.model}:{a.version}: {len(bad)} blobs did not match and were quarantined: " + \
            "; ".join(f"{b.digest}: {b.reason}" for b in bad)
    past = {"promote": "Promoted", "pin": "Pinned", "unpin": "Unpinned"}[action]
    return f"{past} {result.model}:{result.version} ({result.digest})."
