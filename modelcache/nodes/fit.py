"""Whether a node can take an artifact, from the facts it registered or last sent with a heartbeat.

Runtimes and the artifact types each can install (the node agent's layouts):

    ollama   gguf (as an Ollama model), ollama
    hf       safetensors (a Hugging Face snapshot), gguf (a snapshot file llama.cpp and vLLM read)
    files    gguf, safetensors, ollama (a plain directory holds anything)

Of a version's promoted artifacts, a node gets the first its runtimes take, in the order the node
lists its runtimes and then the order above (an ``ollama`` node gets the ``ollama`` artifact over
the GGUF, an ``hf`` node the safetensors one); oldest artifact first among equals. A node that
lists no runtimes is not ruled out by type (the facts do not say). ``free_disk_bytes`` below
the artifact's size rules a node out when it would have to load it; ``gpu_memory_bytes`` below the
size rules it out when the version (or the request) says ``gpu_required``. A fact that is absent
or null is unknown and rules nothing out. The ``ollama`` runtime does not count for a version Ollama
cannot name (a ``+`` in it, a tag over 80 characters): the agent would refuse it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..errors import InvalidInput
from ..formats.ollama import version_name

RUNTIME_TYPES: dict[str, tuple[str, ...]] = {
    "ollama": ("ollama", "gguf"),
    "hf": ("safetensors", "gguf"),
    "files": ("gguf", "safetensors", "ollama"),
}
ANY_TYPE = ("ollama", "gguf", "safetensors")


def runtimes(facts: dict[str, Any]) -> list[str]:
    value = facts.get("runtimes")
    return [r for r in value if isinstance(r, str)] if isinstance(value, list) else []


def artifact_for(facts: dict[str, Any], artifacts: list[dict],
                 version: dict | None = None) -> tuple[dict | None, str]:
    """The artifact this node should pull of these (promoted, oldest first), or None and why not;
    ``version`` (its row: model_vendor, model_name, version) rules out an ollama runtime that cannot name it."""
    if not artifacts:
        return None, "the version has no promoted artifact"
    declared = runtimes(facts)
    if "ollama" in declared and version is not None:
        try:
            version_name(version.get("model_vendor"), version["model_name"], version["version"])
        except InvalidInput as exc:
            declared = [r for r in declared if r != "ollama"]
            if not declared:
                return None, f"its only runtime, ollama, cannot take it: {exc.detail}"
    order: list[str] = []
    for runtime in declared or [None]:
        for kind in RUNTIME_TYPES.get(runtime, ()) if runtime is not None else ANY_TYPE:
            if kind not in order:
                order.append(kind)
    for kind in order:
        for artifact in artifacts:
            if artifact["artifact_type"] == kind:
                return artifact, f"{kind} for runtime {'/'.join(declared) or 'unknown'}"
    types = sorted({a["artifact_type"] for a in artifacts})
    return None, (f"its runtimes ({', '.join(declared)}) take none of the promoted artifact types "
                  f"({', '.join(types)})")


def _number(facts: dict[str, Any], key: str) -> int | None:
    value = facts.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def capacity_problem(facts: dict[str, Any], artifact: dict, *, must_load: bool, gpu_required: bool) -> str | None:
    """Why the node's disk or GPU memory cannot take the artifact, or None."""
    size = artifact["size_bytes"]
    free = _number(facts, "free_disk_bytes")
    if must_load and free is not None and free < size:
        return f"free disk {free} bytes < artifact size {size}"
    gpu = _number(facts, "gpu_memory_bytes")
    if gpu_required and gpu is not None and gpu < size:
        return f"GPU memory {gpu} bytes < artifact size {size} (gpu_required)"
    return None


def is_stale(node: dict, heartbeat_timeout: float, now: dt.datetime) -> bool:
    seen = node["last_seen_at"]
    return seen is None or (now - seen).total_seconds() > heartbeat_timeout


def silence(node: dict, now: dt.datetime) -> str:
    seen = node["last_seen_at"]
    return "never heard from" if seen is None else f"no heartbeat for {(now - seen).total_seconds():.0f}s"
