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
    from ..node.pull import CacheClient, PullSettings

    logs.configure(LogSettings(level="warning"))
    defaults = PullSettings()
    settings = PullSettings(parallel_parts=parallel or defaults.parallel_parts,
                            part_bytes=_parse_bytes(part_size, "--part-size") or defaults.part_bytes,
                            limit_rate=_parse_bytes(limit_rate, "--limit-rate"))

    async def go() -> list[Path]:
        async with CacheClient(url, token, settings) as client:
            target = await client.resolve(ref, artifact_type)
            out = output
            if out is None:
                a = target.artifact
                if target.is_folder:
                    out = Path(f"{a['model']}-{a['version']}")
                else:
                    out = Path(Path(target.files[0].path).name)
            bar = _progress_bar(Path(out).name, total=target.size)
            try:
                results = await client.pull_target(target, out, progress=bar.update)
            finally:
                bar.close()
            return [out] if target.is_folder else [r.path for r in results]

    for path in asyncio.run(go()):
        click.echo(str(path))
