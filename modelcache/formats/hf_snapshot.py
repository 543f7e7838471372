"""Hugging Face snapshot folders: the index must be complete, and config.json tells what the model is (blocking).

A snapshot is a folder artifact of type ``safetensors`` (its files as listed
by :func:`.folder.folder_files`): one or more ``*.safetensors`` shards, a
``*.safetensors.index.json`` naming the shard of every tensor when it is
sharded, ``config.json`` and the tokenizer's files.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import ImportRejected
from .folder import FolderFile
from .reader import read_json_file
from .safetensors import read_safetensors_header, safetensors_capabilities

INDEX_SUFFIX = ".safetensors.index.json"


def snapshot_capabilities(files: Sequence[FolderFile]) -> dict[str, Any]:
    """Every shard's header summed, the index checked, config.json and the chat template read."""
    caps = safetensors_capabilities(read_safetensors_header(f.path) for f in files if f.rel.endswith(".safetensors"))
    check_index(files)
    caps.update(config_capabilities(files))
    return caps


def check_index(files: Sequence[FolderFile]) -> None:
    """A sharded snapshot's index must name only shards that are part of the artifact."""
    present = {f.rel for f in files}
    for index in (f for f in files if "/" not in f.rel and f.rel.endswith(INDEX_SUFFIX)):
        doc = read_json_file(index.path)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise ImportRejected(f"{index.path}: malformed index: expected an object with a weight_map")
        missing = sorted({str(s) for s in weight_map.values()} - present)
        if missing:
            raise ImportRejected(f"{index.path}: incomplete snapshot: the index names {', '.join(missing)}, "
                                 "which is not in the folder")


def config_capabilities(files: Sequence[FolderFile]) -> dict[str, Any]:
    """What a snapshot's config.json and tokenizer_config.json (or chat_template.jinja) tell."""
    by_rel = {f.rel: f.path for f in files}
    caps: dict[str, Any] = {}
    config_path = by_rel.get("config.json")
    if config_path is not None:
        config = read_json_file(config_path)
        if not isinstance(config, dict):
            raise ImportRejected(f"{config_path}: malformed config: expected a JSON object")
        architectures = config.get("architectures")
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
            caps["architecture"] = architectures[0]
        if isinstance(config.get("model_type"), str):
            caps["model_type"] = config["model_type"]
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                caps["context_length"] = value
                break
        if isinstance(config.get("torch_dtype"), str):
            caps["torch_dtype"] = config["torch_dtype"]
    template = False
    tokenizer_config = by_rel.get("tokenizer_config.json")
    if tokenizer_config is not None:
        doc = read_json_file(tokenizer_config)
        template = isinstance(doc, dict) and bool(doc.get("chat_template"))
    caps["chat_template"] = template or "chat_template.jinja" in by_rel
    return caps
