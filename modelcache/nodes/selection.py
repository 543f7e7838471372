"""Selection: which model version, artifact and node a task should use, and whether it must load first.

Candidates are pairs of a version and a node:

- versions: those meeting the capability requirements (the query of ``GET /v1/versions``) and the
  model/version named, with at least one promoted artifact — only promoted artifacts are ever chosen;
- nodes: the candidates named, else every registered node; never a stale one (no heartbeat within
  ``nodes.heartbeat_timeout``), never one that failed this version within ``nodes.failure_backoff``,
  never one whose facts rule the artifact out (``fit.py``: runtimes, free disk when it must load,
  GPU memory when ``gpu_required``).

The best pair is the first in this order: the version's availability on the node (``available``,
then ``loading``, then anything else) when the preference ``models.nodes.prefer_local_cache`` is
true (when false availability does not rank); then the newest version; then the node with the
fewest available models (spreading load); then node name and id, so the answer is stable.

``use``: the node has the version. ``load``: it must fetch it, and a load request is made (or the
open one returned). Every exclusion and the choice itself are in ``reasons``; the decision is audited.
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import preferences
from ..auth import Subject
from ..config import Settings
from ..db import Database, audit, models
from ..db import nodes as rows
from ..errors import ModelcacheError, NotFound
from . import fit
from .registry import label, now, request_load, version_label

MAX_VERSIONS = 200
_AVAILABILITY_RANK = {"available": 0, "loading": 1}


class NothingFits(ModelcacheError):
    """No version, or no node, meets the request; ``reasons`` says what ruled each out."""

    def __init__(self, status: int, detail: str, reasons: list[str]) -> None:
        super().__init__(detail)
        self.status = status
        self.title = "No version fits" if status == 422 else "No node fits"
        self.reasons = reasons
        self.extensions = {"reasons": reasons}


@dataclass
class Decision:
    version: dict
    artifact: dict
    node: dict
    action: str  # use | load
    load: dict | None
    reasons: list[str] = field(default_factory=list)
    status: str | None = None  # the version's availability on the node


@dataclass(frozen=True)
class Request:
    requirements: dict[str, Any]  # capabilities form: context_length, tool_use, ..., languages
    model: str | None = None
    vendor: str | None = None
    version: str | None = None
    node_ids: list[uuid.UUID] | None = None


def _describe(req: Request) -> str:
    parts = [f"{k}={v}" for k, v in req.requirements.items()]
    if req.model:
        parts.append(f"model {req.vendor + '/' if req.vendor else ''}{req.model}")
    if req.version:
        parts.append(f"version {req.version}")
    return ", ".join(parts) or "no requirements"


async def select(db: Database, settings: Settings, req: Request, subject: Subject) -> Decision:
    prefer_local = bool((await preferences.effective(db))["models.nodes.prefer_local_cache"])
    reasons: list[str] = []
    at = now()
    async with db.connection() as conn:
        versions, _ = await models.list_versions(conn, model_id=None, model=req.model, vendor=req.vendor,
                                                 version=req.version, requires=req.requirements,
                                                 promoted_only=True, limit=MAX_VERSIONS, cursor=None)
        versions.reverse()  # newest first
        nodes = await rows.nodes_by_id(conn, req.node_ids)
        version_ids = [v["id"] for v in versions]
        node_ids = [n["id"] for n in nodes]
        held = {(a["node_id"], a["model_version_id"]): a
                for a in await rows.availability(conn, version_ids=version_ids)} if versions else {}
        failed = await rows.recent_failures(conn, node_ids, version_ids, settings.nodes.failure_backoff)
        artifacts = await rows.promoted_artifacts(conn, version_ids)
    if req.node_ids is not None:
        missing = set(req.node_ids) - set(node_ids)
        if missing:
            raise NotFound(f"no node {', '.join(sorted(map(str, missing)))}: register it first (POST /v1/nodes)")
    if not versions:
        reasons.append(f"no model version with a promoted artifact meets {_describe(req)}")
        await _audit(db, subject, req, None, reasons)
        raise NothingFits(422, reasons[0], reasons)
    if not nodes:
        reasons.append("no node is registered")

    candidates = []
    for node in nodes:
        if fit.is_stale(node, settings.nodes.heartbeat_timeout, at):
            reasons.append(f"skipped node {label(node)}: stale ({fit.silence(node, at)}, "
                           f"nodes.heartbeat_timeout {settings.nodes.heartbeat_timeout:g}s)")
            continue
        for rank, version in enumerate(versions):
            key = (node["id"], version["id"])
            status = held[key]["status"] if key in held else None
            if key in failed and status != "available":
                why = failed[key]["error"] or "no error given"
                reasons.append(f"skipped node {label(node)} for {version_label(version)}: it failed to load it "
                               f"at {failed[key]['at'].isoformat(timespec='seconds')} ({why}; "
                               f"nodes.failure_backoff {settings.nodes.failure_backoff:g}s)")
                continue
            artifact, why = fit.artifact_for(node["facts"], artifacts[version["id"]], version)
            if artifact is None:
                reasons.append(f"skipped node {label(node)} for {version_label(version)}: {why}")
                continue
            gpu_required = bool(req.requirements.get("gpu_required") or version["capabilities"].get("gpu_required"))
            problem = fit.capacity_problem(node["facts"], artifact, must_load=status != "available",
                                           gpu_required=gpu_required)
            if problem is not None:
                reasons.append(f"skipped node {label(node)} for {version_label(version)}: {problem}")
                continue
            order = (_AVAILABILITY_RANK.get(status, 2) if prefer_local else 0, rank, node["available_models"],
                     node["name"], str(node["id"]))
            candidates.append((order, node, version, artifact, status))
    if not candidates:
        detail = f"no node can run a model version meeting {_describe(req)}"
        reasons.insert(0, detail)
        await _audit(db, subject, req, None, reasons)
        raise NothingFits(409, detail, reasons)

    _, node, version, artifact, status = min(candidates, key=lambda c: c[0])
    action = "use" if status == "available" else "load"
    reasons.insert(0, f"chose node {label(node)} for {version_label(version)} "
                      f"({artifact['artifact_type']} sha256:{artifact['sha256'][:12]}): "
                      + ("it has the version available" if action == "use" else
                         f"it must load it (its status: {status or 'none'})")
                      + f"; prefer_local_cache is {'true' if prefer_local else 'false'}"
                      + ("" if prefer_local else " (availability did not rank)")
                      + f"; {node['available_models']} models available there; {len(candidates)} candidates")
    load = None
    async with db.transaction() as conn:
        if action == "load":
            load, _ = await request_load(conn, node, version["id"], subject, artifact=artifact)
        decision = Decision(version, artifact, node, action, load, reasons, status)
        await _audit_in(conn, subject, req, decision, reasons)
    return decision


async def _audit(db: Database, subject: Subject, req: Request, decision: Decision | None,
                 reasons: list[str]) -> None:
    async with db.connection() as conn:
        await _audit_in(conn, subject, req, decision, reasons)


async def _audit_in(conn, subject: Subject, req: Request, decision: Decision | None, reasons: list[str]) -> None:
    details: dict[str, Any] = {"requirements": req.requirements, "model": req.model, "vendor": req.vendor,
                               "version": req.version,
                               "nodes": [str(n) for n in req.node_ids] if req.node_ids is not None else None,
                               "reasons": reasons}
    if decision is None:
        await audit.audit(conn, subject, "model_version.select", "model_version", None, outcome="no_fit",
                          reason=reasons[0] if reasons else None, details=details)
        return
    details.update(node_id=str(decision.node["id"]), action=decision.action,
                   artifact=f"sha256:{decision.artifact['sha256']}",
                   load_request=str(decision.load["id"]) if decision.load else None)
    await audit.audit(conn, subject, "model_version.select", "model_version", str(decision.version["id"]),
                      outcome=decision.action, details=details)


def pull_instructions(decision: Decision, cache_url: str) -> dict[str, Any]:
    """Ready-to-use ways to fetch the chosen artifact from this cache (see :func:`artifact_pull`)."""
    version, artifact = decision.version, decision.artifact
    return artifact_pull(version["model_vendor"], version["model_name"], version["version"], artifact["sha256"],
                         artifact["artifact_type"], cache_url)


def artifact_pull(vendor: str | None, name: str, tag: str, sha256: str, artifact_type: str,
                  cache_url: str) -> dict[str, Any]:
    """Ready-to-use ways to fetch an artifact from this cache: curl by digest always; an ``ollama pull``
    name for gguf and ollama artifacts; the HF mirror for safetensors ones. The one rule, for the
    selection's answer and the dashboard alike."""
    digest = f"sha256:{sha256}"
    extension = {"gguf": "gguf", "safetensors": "safetensors", "ollama": "json"}[artifact_type]
    target = shlex.quote(f"{name}-{tag}.{extension}")
    out: dict[str, Any] = {
        "curl": f'curl -H "Authorization: Bearer $TOKEN" -o {target} {cache_url}/v1/blobs/{digest}',
        "ollama": None, "hf": None}
    if artifact_type in ("gguf", "ollama"):
        host = cache_url.split("://", 1)[1].rstrip("/")
        out["ollama"] = f"{host}/{(vendor or 'library').lower()}/{name.lower()}:{tag}"
    if artifact_type == "safetensors":
        out["hf"] = {"endpoint": f"{cache_url}/hf", "repo": f"{vendor}/{name}" if vendor else name, "revision": tag}
    return out
