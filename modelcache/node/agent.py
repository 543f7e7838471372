"""The node agent (``modelcache node``): takes the cache's load requests for this node, pulls, installs, reports.

It talks to one cache only (the one in its config) with its node token:

- at start it reports what its runtimes hold of what it installed before (``<state_dir>/installed.json``):
  ``available`` when the files are there, ``evicted`` when someone removed them (an Ollama manifest gone);
- it heartbeats its facts (runtimes, free disk of its folders, GPU memory from ``nvidia-smi`` or null)
  every ``heartbeat_seconds``, and then re-checks what it installed;
- it long-polls ``GET /v1/nodes/{id}/loads?wait=30``; for each new load it acks, reports ``loading`` (with
  bytes done, every few seconds), pulls each blob once into its store, installs into every runtime that
  takes the artifact's type, and reports ``available`` — or ``failed`` with the error;
- a load whose version is already installed everywhere is reported ``available`` without a pull;
- the cache going away (a restart, a network drop) is waited out with backoff, never a crash; a pull
  interrupted that way resumes its completed parts on the next attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, ModelcacheError
from .pull import CacheClient, CacheUnreachable, PullSettings
from .runtimes import Installed, Inventory, Job, NodeStore, Runtime, make_runtimes

logger = logging.getLogger(__name__)

POLL_WAIT = 30
_BACKOFF_MAX = 30.0
_PROGRESS_EVERY = 2.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent runs with; ``load`` reads it from the TOML ``node-register`` wrote, plus flags."""

    cache_url: str
    node_id: str
    token: str
    runtimes: tuple[str, ...] = ("files",)
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("XDG_STATE_HOME")
                                                         or Path.home() / ".local" / "state") / "modelcache" / "node")
    ollama_models: Path | None = None
    ollama_alias: bool = False
    hf_cache: Path | None = None
    files_dir: Path | None = None
    heartbeat_seconds: float = 15.0
    pull: PullSettings = field(default_factory=PullSettings)

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> "AgentConfig":
        """The TOML file (top-level keys as the fields, ``[pull]`` for the pull settings), then the flags."""
        doc: dict[str, Any] = {}
        if path is not None:
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read node config {path}: {exc}") from None
        pull = doc.pop("pull", {}) or {}
        doc.pop("token_name", None)
        doc.update({k: v for k, v in overrides.items() if v not in (None, ())})
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"node config {path}: unknown keys {', '.join(sorted(unknown))}")
        for key in ("cache_url", "node_id", "token"):
            if not doc.get(key):
                raise ConfigError(f"node config: no {key} (from --config NODE.toml written by "
                                  f"`modelcache node-register`, or --{key.replace('_', '-').replace('cache-', '')})")
        for key in ("state_dir", "ollama_models", "hf_cache", "files_dir"):
            if doc.get(key) is not None:
                doc[key] = Path(doc[key]).expanduser()
        if isinstance(doc.get("runtimes"), (list, tuple)):
            doc["runtimes"] = tuple(doc["runtimes"])
        try:
            settings = PullSettings(**{k: int(v) for k, v in pull.items()
                                       if k in ("parallel_parts", "part_bytes", "limit_rate")})
            return cls(pull=settings, **doc)
        except TypeError as exc:
            raise ConfigError(f"node config {path}: {exc}") from None

    @property
    def cache_host(self) -> str:
        """``host:port`` of the cache, the first part of the Ollama names the agent installs."""
        parts = urlsplit(self.cache_url)
        return parts.netloc.rpartition("@")[2] or "modelcache"


def gpu_memory_bytes() -> int | None:
    """Total GPU memory from ``nvidia-smi`` (all GPUs), or None when there is none to ask."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(float(line)) for line in out.split() if line.strip()) * (1 << 20)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.warning("nvidia-smi did not say the GPU memory (%s): reporting none", exc)
        return None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.runtimes: list[Runtime] = make_runtimes(
            config.runtimes, cache_host=config.cache_host, ollama_models=config.ollama_models,
            ollama_alias=config.ollama_alias, hf_cache=config.hf_cache, files_dir=config.files_dir)
        self.store = NodeStore(config.state_dir)
        self.inventory = Inventory(config.state_dir)
        self.installed: list[Installed] = []
        self.working: dict[str, asyncio.Task] = {}  # load id -> its task
        self.base = f"/v1/nodes/{config.node_id}"
        self._gpu: int | None = None

    # -- the loops --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._gpu = await asyncio.to_thread(gpu_memory_bytes)
        self.installed = self.inventory.load()  # and holds the state dir's lock until the finally below
        try:
            logger.info("node agent %s for %s: runtimes %s, state in %s, %d installed before", self.config.node_id,
                        self.config.cache_url, ",".join(r.name for r in self.runtimes), self.config.state_dir,
                        len(self.installed))
            async with CacheClient(self.config.cache_url, self.config.token, self.config.pull) as client:
                self.client = client
                loops = [asyncio.create_task(self._forever("heartbeat", self._heartbeat, stop)),
                         asyncio.create_task(self._forever("loads", self._poll_loads, stop))]
                await stop.wait()
                for task in (*loops, *self.working.values()):
                    task.cancel()
                await asyncio.gather(*loops, *self.working.values(), return_exceptions=True)
        finally:
            self.inventory.close()

    async def _forever(self, what: str, step, stop: asyncio.Event) -> None:
        """Run ``step`` again and again; any failure is logged in one line, waits (1 s, doubling to 30 s) and
        tries again: a loop that ended would leave the process up doing nothing."""
        delay = 1.0
        while not stop.is_set():
            try:
                await step()
                delay = 1.0
                continue
            except asyncio.CancelledError:
                raise
            except CacheUnreachable as exc:  # a cache restart or a proxy's page: expected, waited out
                logger.warning("%s: %s; trying again in %.0fs", what, exc.detail, delay)
            except (ModelcacheError, OSError) as exc:
                detail = exc.detail if isinstance(exc, ModelcacheError) else str(exc)
                logger.error("%s: %s; trying again in %.0fs", what, detail, delay)
            except Exception as exc:  # a bug, or an answer of a shape we did not expect: say where
                logger.error("%s: %s: %s; trying again in %.0fs", what, type(exc).__name__, exc, delay,
                             exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _heartbeat(self) -> None:
        first = not getattr(self, "_reported_inventory", False)
        await self.client.call("POST", f"{self.base}/heartbeat", body={"facts": await asyncio.to_thread(self.facts)})
        if first:
            logger.info("connected to %s as node %s", self.config.cache_url, self.config.node_id)
        await self._report_inventory(everything=first)
        self._reported_inventory = True
        await asyncio.sleep(self.config.heartbeat_seconds)

    def facts(self) -> dict[str, Any]:
        folders = [self.config.state_dir, *(p for p in (self.config.ollama_models, self.config.hf_cache,
                                                         self.config.files_dir) if p is not None)]
        free = []
        for folder in folders:
            try:
                free.append(shutil.disk_usage(_existing(folder)).free)
            except OSError:
                continue
        return {"runtimes": [r.name for r in self.runtimes], "gpu_memory_bytes": self._gpu,
                "free_disk_bytes": min(free) if free else None}

    async def _report_inventory(self, everything: bool) -> None:
        """What the runtimes hold of what this agent installed: ``available`` (at start), ``evicted`` when
        its files are gone (then forgotten, so a new load installs it again)."""
        by_version: dict[str, list[Installed]] = {}
        for entry in self.installed:
            by_version.setdefault(entry.model_version_id, []).append(entry)
        busy = {t.get_name() for t in self.working.values()}
        for version_id, entries in by_version.items():
            if version_id in busy:
                continue
            gone = [e for e in entries if not await asyncio.to_thread(e.present)]
            if gone:
                logger.info("model version %s was removed from %s: reporting evicted", version_id,
                            ", ".join(e.runtime for e in gone))
                await self._report(version_id, "evicted", runtime=",".join(e.runtime for e in gone))
                self.installed = [e for e in self.installed if e.model_version_id != version_id]
                await asyncio.to_thread(self.inventory.save, self.installed)
            elif everything:
                await self._report(version_id, "available", runtime=",".join(e.runtime for e in entries))

    async def _poll_loads(self) -> None:
        body = await self.client.call("GET", f"{self.base}/loads", query={"wait": POLL_WAIT}, timeout=POLL_WAIT + 15)
        new = [load for load in body["loads"] if str(load["id"]) not in self.working]
        for load in new:
            task = asyncio.create_task(self._load(load), name=str(load["model_version_id"]))
            self.working[str(load["id"])] = task
            task.add_done_callback(lambda t, lid=str(load["id"]): self.working.pop(lid, None))
        if not new:
            # the open loads are ours already: the long-poll would answer at once, so wait for one to end
            if self.working:
                await asyncio.wait(list(self.working.values()), timeout=5, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(1)

    # -- one load -----------------------------------------------------------------------

    async def _load(self, load: dict[str, Any]) -> None:
        version_id, load_id = str(load["model_version_id"]), str(load["id"])
        label = f"{load.get('vendor') + '/' if load.get('vendor') else ''}{load['model']}:{load['version']}"
        delay = 1.0
        while True:
            try:
                return await self._install(load, version_id, load_id, label)
            except asyncio.CancelledError:
                raise
            except CacheUnreachable as exc:
                # the cache went away mid-load: completed parts stay, so trying again resumes
                logger.warning("load %s of %s: %s; trying again in %.0fs", load_id, label, exc.detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            except Exception as exc:  # the load fails with the reason; the agent goes on with the others
                detail = exc.detail if isinstance(exc, ModelcacheError) else f"{type(exc).__name__}: {exc}"
                logger.error("load %s of %s failed: %s", load_id, label, detail,
                             exc_info=not isinstance(exc, (ModelcacheError, OSError)))
                try:
                    await self._report(version_id, "failed", error=detail[:2000])
                except ModelcacheError as report_exc:
                    logger.warning("could not report load %s failed: %s", load_id, report_exc.detail)
                return

    async def _install(self, load: dict[str, Any], version_id: str, load_id: str, label: str) -> None:
        if load.get("state") == "pending":
            await self.client.call("POST", f"{self.base}/loads/{load_id}/ack")
        ref = load.get("artifact") or {}
        artifact = await self.client.call("GET", f"/v1/artifacts/{ref.get('id') or ref['digest']}")
        wanting = [r for r in self.runtimes if r.wants(artifact["artifact_type"])]
        if not wanting:
            raise ModelcacheError(f"no runtime of this node ({', '.join(r.name for r in self.runtimes)}) takes "
                                  f"{artifact['artifact_type']} artifacts like {artifact['digest']}")
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n

        job = Job(artifact, version_id, self.store, self.client, progress)  # its names parse, or nothing moves
        wanting = self._able(wanting, job, load_id, label)  # checked before any of them pulls a byte
        names = ",".join(r.name for r in wanting)
        held = {e.runtime for e in self.installed if e.model_version_id == version_id
                and e.artifact_digest == artifact["digest"] and e.present()}
        if all(r.name in held for r in wanting):
            logger.info("load %s: %s is already installed (%s): reporting available", load_id, label, names)
            await self._report(version_id, "available", runtime=names)
            return
        await self._report(version_id, "loading", runtime=names, bytes_done=0)
        reporter = asyncio.create_task(self._report_progress(version_id, names, lambda: done))
        try:
            for runtime in wanting:
                if runtime.name in held:
                    continue
                entry = await runtime.install(job)
                self.installed = [e for e in self.installed
                                  if (e.runtime, e.model_version_id) != (entry.runtime, version_id)] + [entry]
                await asyncio.to_thread(self.inventory.save, self.installed)
        finally:
            reporter.cancel()
        logger.info("load %s: installed %s (%s) into %s: reporting available", load_id, label, artifact["digest"],
                    names)
        await self._report(version_id, "available", runtime=names, bytes_done=artifact["size_bytes"])

    @staticmethod
    def _able(wanting: list[Runtime], job: Job, load_id: str, label: str) -> list[Runtime]:
        """The runtimes that can take the job (``check``); the first refusal when none can."""
        able, refusals = [], []
        for runtime in wanting:
            try:
                runtime.check(job)
                able.append(runtime)
            except ModelcacheError as exc:
                refusals.append(exc)
                logger.warning("load %s of %s: runtime %s cannot take it: %s", load_id, label, runtime.name,
                               exc.detail)
        if not able:
            raise refusals[0]
        return able

    async def _report_progress(self, version_id: str, runtime: str, bytes_done) -> None:
        last = -1
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            now = max(0, bytes_done())
            if now != last:
                try:
                    await self._report(version_id, "loading", runtime=runtime, bytes_done=now)
                except ModelcacheError as exc:
                    logger.warning("progress report for %s: %s", version_id, exc.detail)
                last = now

    async def _report(self, version_id: str, status: str, **details: Any) -> None:
        await self.client.call("POST", f"{self.base}/availability", body={
            "model_version_id": version_id, "status": status,
            "details": {k: v for k, v in details.items() if v is not None}})


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

