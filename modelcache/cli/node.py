"""Node-side verbs: ``pull`` (a blob or an artifact from the cache) and ``node`` (the node agent)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from .. import logs
from ..config import LogSettings
from . import _progress_bar, main

logger = logging.getLogger(__name__)


def _parse_bytes(text: str | None, what: str) -> int | None:
    """``123``, ``64k``, ``16M``, ``1G`` (powers of 1024) -> bytes."""
    from ..errors import InvalidInput

    if text is None:
        return None
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    number, unit = text.rstrip("kKmMgGiB"), text[len(text.rstrip("kKmMgGiB")):].lower().rstrip("ib")
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise InvalidInput(f"invalid {what} {text!r}: expected a number of bytes, e.g. 16M or 1G") from None


@main.command()
@click.argument("ref")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Where to write: a file, or a folder for a multi-file artifact "
                   "(default: the file's name, or MODEL-VERSION/, in the current folder).")
@click.option("--url", default=None, help="modelcache URL (env MODELCACHE_URL; default http://127.0.0.1:12085).")
@click.option("--token", default=None, help="API token (env MODELCACHE_TOKEN); none for a trusted network.")
@click.option("--type", "artifact_type", default=None, help="Artifact type, when a version has several.")
@click.option("--parallel", type=int, default=None, help="Ranged GETs at once (default 4).")
@click.option("--part-size", default=None, help="Bytes per ranged GET, e.g. 16M (default 16M).")
@click.option("--limit-rate", default=None, help="Cap on bytes per second over all parts, e.g. 50M.")
def pull(ref: str, output: Path | None, url: str | None, token: str | None, artifact_type: str | None,
         parallel: int | None, part_size: str | None, limit_rate: str | None) -> None:
    """Pull REF (sha256:<hex> or [vendor/]model:version) from the cache: parallel ranged parts, resumed after
    a kill, sha256 verified before the file is renamed into place. Prints the path(s) written."""
    from ..node.pull import CacheClient, PullSettings, default_output

    logs.configure(LogSettings(level="warning"))
    defaults = PullSettings()
    settings = PullSettings(parallel_parts=parallel or defaults.parallel_parts,
                            part_bytes=_parse_bytes(part_size, "--part-size") or defaults.part_bytes,
                            limit_rate=_parse_bytes(limit_rate, "--limit-rate"))

    async def go() -> list[Path]:
        async with CacheClient(url, token, settings) as client:
            target = await client.resolve(ref, artifact_type)
            out = output if output is not None else default_output(target, client.url)
            bar = _progress_bar(Path(out).name, total=target.size)
            try:
                results = await client.pull_target(target, out, progress=bar.update)
            finally:
                bar.close()
            return [out] if target.is_folder else [r.path for r in results]

    for path in asyncio.run(go()):
        click.echo(str(path))


@main.command("node")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="The node's TOML config, as `modelcache node-register --config-out` wrote it.")
@click.option("--url", default=None, help="The cache's URL (cache_url).")
@click.option("--token", default=None, help="This node's token (token).")
@click.option("--node-id", default=None, help="This node's id (node_id).")
@click.option("--runtime", "runtimes", multiple=True, help="ollama, hf or files; repeat for several (runtimes).")
@click.option("--ollama-models", type=click.Path(path_type=Path), default=None,
              help="Ollama models dir (default OLLAMA_MODELS, else ~/.ollama/models).")
@click.option("--ollama-alias", is_flag=True, default=None,
              help="Also name models registry.ollama.ai/library/MODEL:TAG, so a plain `ollama run MODEL:TAG` works.")
@click.option("--hf-home", type=click.Path(path_type=Path), default=None,
              help="HF_HOME: the Hugging Face cache is DIR/hub (default HF_HUB_CACHE, else ~/.cache/huggingface/hub).")
@click.option("--hf-cache", type=click.Path(path_type=Path), default=None, help="The Hugging Face hub cache itself.")
@click.option("--files-dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the files runtime: DIR/VENDOR/MODEL/VERSION/FILE.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The node's blob store and inventory (default ~/.local/state/modelcache/node).")
@click.option("--heartbeat", "heartbeat_seconds", type=float, default=None, help="Seconds between heartbeats (15).")
@click.option("--log-level", default="info", show_default=True)
def node_agent(config_file: Path | None, url: str | None, token: str | None, node_id: str | None,
               runtimes: tuple[str, ...], ollama_models: Path | None, ollama_alias: bool | None, hf_home: Path | None,
               hf_cache: Path | None, files_dir: Path | None, state_dir: Path | None,
               heartbeat_seconds: float | None, log_level: str) -> None:
    """Run the node agent: take this node's load requests, pull from the cache, install, report."""
    import signal

    from ..node.agent import Agent, AgentConfig

    logs.configure(LogSettings(level=log_level))
    config = AgentConfig.load(config_file, {
        "cache_url": url, "token": token, "node_id": node_id, "runtimes": tuple(runtimes) or None,
        "ollama_models": ollama_models, "ollama_alias": ollama_alias,
        "hf_cache": hf_cache or (hf_home / "hub" if hf_home else None), "files_dir": files_dir,
        "state_dir": state_dir, "heartbeat_seconds": heartbeat_seconds})
    agent = Agent(config)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(go())
