"""Where a node puts a model so its engine finds it, and the one copy of each blob behind every layout.

A node keeps each blob once, in its own store, and hard-links it into every layout that wants it (a GGUF
is at once an Ollama layer, a Hugging Face snapshot file and a plain ``.gguf``)::

    <state_dir>/blobs/sha256/<hex>                        the node's one copy (read-only), pulled and verified
    <state_dir>/installed.json                            what the agent installed, to report at its next start
    <state_dir>/agent.lock                                flock()ed by the one agent using this state dir

    ollama  <OLLAMA_MODELS>/blobs/sha256-<hex>            hard links
            <OLLAMA_MODELS>/manifests/<cache host:port>/<vendor|library>/<model>/<version>
            <OLLAMA_MODELS>/manifests/registry.ollama.ai/library/<model>/<version>   with --ollama-alias
    hf      <HF_HUB_CACHE>/models--<vendor>--<model>/blobs/<sha256>                 hard links
                                         .../snapshots/<commit>/<path> -> ../../blobs/<sha256>   relative links
                                         .../refs/<version>, refs/main           the commit, no newline
    files   <files_dir>/<vendor|library>/<model>/<version>/<path>                 hard links

Every layout is written so its engine never sees half of a model: blobs first, then the file that makes
the model visible (the Ollama manifest, the HF ref), each by a rename. The HF commit is the mirror's commit
id (the first 40 hex of the artifact digest, ``server/hf/index.py``), so a node's cache and ``/hf`` agree.
Hard links need one filesystem; across filesystems a blob is copied instead, with a warning line.

Vendor, model and version come from the cache and become folder names, so each is parsed with the cache's
own name rules (``names.py``) before any path is built: a name that could leave its folder fails the load.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from ..digest import Digest
from ..errors import Conflict, InvalidInput, StorageFull
from ..formats.ollama import DEFAULT_NAMESPACE, Manifest, ModelName, ModelsDir, version_name
from ..names import parse_model_name, parse_vendor, parse_version
from .pull import CacheClient, OnBytes, RefusedAnswer, RemoteFile, safe_relative, target_of

logger = logging.getLogger(__name__)

DOCKER_MANIFEST_PATHS = {"gguf": ".ollama/docker-manifest.json", "ollama": "manifest"}


# -- the node's one copy of each blob ------------------------------------------------


class NodeStore:
    """``<state_dir>/blobs/sha256/<hex>``: a blob is there only once pulled and verified (renamed into place)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "blobs" / "sha256"
        # one lock per digest: two loads sharing a blob (llama3:8b and llama3:latest) pull it once, the second
        # waiting for the first (the pull's flock of the partial would refuse it). Kept for the process's life:
        # one small lock per blob the node ever pulled.
        self._pulling: dict[str, asyncio.Lock] = {}

    def path_for(self, digest: Digest) -> Path:
        return self.root / digest.hex

    def has(self, digest: Digest, size: int) -> bool:
        try:
            return self.path_for(digest).stat().st_size == size
        except OSError:
            return False

    async def ensure(self, client: CacheClient, digest: Digest, size: int, progress: OnBytes | None = None) -> Path:
        """The blob's path here, pulled from the cache unless it already is here (or another load of this
        process is pulling it: then this waits for that pull and uses its blob, or pulls again if it failed)."""
        path = self.path_for(digest)
        async with self._pulling.setdefault(digest.hex, asyncio.Lock()):
            if self.has(digest, size):
                if progress:
                    progress(size)
                return path
            self.root.mkdir(parents=True, exist_ok=True)
            await client.pull_blob(digest, path, size=size, progress=progress)
            os.chmod(path, 0o444)
            return path


def link_into(blob: Path, dest: Path) -> None:
    """``dest`` becomes a hard link to ``blob`` (a copy across filesystems), replacing what was there by a rename."""
    try:
        if os.path.samefile(blob, dest):
            return
    except OSError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(blob, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        logger.warning("cannot hard-link blob %s to %s (%s): copying it instead", blob, dest, os.strerror(exc.errno))
        _copy(blob, tmp, dest)
    os.replace(tmp, dest)


def _copy(blob: Path, tmp: Path, dest: Path) -> None:
    """Copy ``blob`` to ``tmp`` and fsync it; a failed copy leaves no ``tmp`` behind (no later run removes it)."""
    try:
        shutil.copyfile(blob, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"no room to copy blob {blob} ({blob.stat().st_size} bytes) to {dest}: "
                              f"{os.strerror(exc.errno)} (free space there, or keep that folder on the state dir's "
                              "filesystem, where blobs are hard-linked, not copied)") from None
        raise


def write_file(dest: Path, data: bytes) -> None:
    """Write ``data`` to a temp sibling, fsync it, rename it to ``dest``: a reader sees all of it or none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- what is installed ------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """One model version installed into one runtime: enough to tell, later, whether it is still there."""

    runtime: str
    model_version_id: str
    artifact_digest: str
    paths: tuple[str, ...]  # the files whose presence means the model is there (a manifest, a ref, the files)

    def present(self) -> bool:
        return all(os.path.exists(p) for p in self.paths)

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "model_version_id": self.model_version_id,
                "artifact_digest": self.artifact_digest, "paths": list(self.paths)}

    @classmethod
    def from_json(cls, doc: Any) -> "Installed":
        """One entry of ``installed.json``; ValueError saying what is wrong with any other shape."""
        if not isinstance(doc, dict):
            raise ValueError(f"an entry is {type(doc).__name__}, expected an object")
        for key in ("runtime", "model_version_id", "artifact_digest"):
            if not isinstance(doc.get(key), str):
                raise ValueError(f"entry {key!r} is {doc.get(key)!r}, expected a string")
        paths = doc.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"entry 'paths' is {paths!r}, expected a list of strings")
        return cls(doc["runtime"], doc["model_version_id"], doc["artifact_digest"], tuple(paths))


class StateDirLock:
    """``<state_dir>/agent.lock``, flock()ed: one agent per state dir, or two would overwrite each other's
    ``installed.json`` (the default state dir is shared by every agent of a user on a host)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "agent.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when held); Conflict when another agent holds it. Held until ``release``
        or the process ends."""
        if self._fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Conflict(f"state dir {self.state_dir} is in use by another node agent (pid {holder}): give "
                           "each agent its own --state-dir (or state_dir in its config)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message another agent shows
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


class Inventory:
    """``<state_dir>/installed.json``: what this node installed, per runtime and model version. Loading it
    takes the state dir's lock (``StateDirLock``), held while this inventory lives."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "installed.json"
        self.lock = StateDirLock(state_dir)

    def load(self) -> list[Installed]:
        self.lock.acquire()
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s (%s): starting with an empty inventory", self.path, exc)
            return []
        try:
            if not isinstance(doc, dict) or not isinstance(doc.get("installed"), list):
                raise ValueError(f"expected {{\"installed\": [...]}}, found {json.dumps(doc)[:100]}")
            return [Installed.from_json(d) for d in doc["installed"]]
        except ValueError as exc:
            logger.warning("cannot read %s (%s): starting with an empty inventory", self.path, exc)
            return []

    def close(self) -> None:
        """Let another agent use the state dir."""
        self.lock.release()

    def save(self, entries: Iterable[Installed]) -> None:
        write_file(self.path, json.dumps({"installed": [e.to_json() for e in entries]}, indent=1).encode())


# -- runtimes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One artifact to install: its registry row (with files), the node's store and the cache client."""

    artifact: dict[str, Any]
    model_version_id: str
    store: NodeStore
    client: CacheClient
    progress: OnBytes | None = None

    def __post_init__(self) -> None:
        # names from the cache become folders: one that does not parse fails the job before any path is built
        _ = (self.vendor, self.model, self.version)

    @property
    def vendor(self) -> str | None:
        return self._name(parse_vendor, self.artifact.get("vendor") or None)

    @property
    def model(self) -> str:
        return self._name(parse_model_name, self.artifact.get("model"))

    @property
    def version(self) -> str:
        return self._name(parse_version, self.artifact.get("version"))

    def _name(self, parse: Callable[[Any], Any], value: Any) -> Any:
        """The cache's own name rules: a name that could leave its folder ('..', '/') never becomes a path."""
        try:
            return parse(value)
        except InvalidInput as exc:
            raise RefusedAnswer(f"artifact {self.artifact.get('digest')} from the cache: {exc.detail}") from None

    @property
    def own_files(self) -> tuple[RemoteFile, ...]:
        return target_of(self.artifact).files

    def file(self, path: str) -> RemoteFile:
        for f in self.artifact["files"]:
            if f["path"] == path:
                return RemoteFile(f["path"], Digest.parse(f["digest"]), int(f["size_bytes"]))
        raise InvalidInput(f"artifact {self.artifact['digest']} has no file {path}")

    async def blob(self, f: RemoteFile) -> Path:
        return await self.store.ensure(self.client, f.digest, f.size, self.progress)


class Runtime(Protocol):
    name: str

    def wants(self, artifact_type: str) -> bool: ...

    def check(self, job: Job) -> None:
        """Raise if this runtime cannot take ``job``: called for every runtime before any byte is pulled."""

    async def install(self, job: Job) -> Installed: ...


class OllamaRuntime:
    """An Ollama models directory: blobs, then the manifest last (Ollama lists a model once its manifest is
    there, so it never lists half of one)."""

    name = "ollama"

    def __init__(self, models_dir: Path, cache_host: str, alias: bool = False) -> None:
        self.models = ModelsDir(models_dir)
        self.cache_host = cache_host
        self.alias = alias

    def wants(self, artifact_type: str) -> bool:
        return artifact_type in DOCKER_MANIFEST_PATHS

    def names(self, job: Job) -> list[ModelName]:
        """The Ollama names to install as; InvalidInput for a version Ollama cannot take ('+', over 80)."""
        names = [version_name(job.vendor, job.model, job.version, self.cache_host)]
        if self.alias:
            names.append(version_name(None, job.model, job.version))
        return names

    def check(self, job: Job) -> None:
        self.names(job)

    async def install(self, job: Job) -> Installed:
        names = self.names(job)  # before any pull: a name Ollama refuses fails the load at once
        manifest_file = job.file(DOCKER_MANIFEST_PATHS[job.artifact["artifact_type"]])
        raw = await job.client.fetch_small(manifest_file.digest)
        manifest = Manifest.parse(raw, f"manifest {manifest_file.digest} of artifact {job.artifact['digest']}")
        for d in manifest.blobs:
            blob = await job.blob(RemoteFile(str(d.digest), d.digest, d.size, d.media_type))
            await asyncio.to_thread(link_into, blob, self.models.root / "blobs" / f"sha256-{d.digest.hex}")
        paths = []
        for name in names:
            path = self.models.manifest_path(name)
            await asyncio.to_thread(write_file, path, raw)  # last: the model appears whole
            paths.append(str(path))
            logger.info("ollama: installed %s (manifest %s, %d blobs) at %s", name, manifest_file.digest,
                        len(manifest.blobs), path)
        return Installed(self.name, job.model_version_id, job.artifact["digest"], tuple(paths))


def hf_repo_folder(vendor: str | None, model: str) -> str:
    """huggingface_hub's folder name for a model repo (``repo_folder_name``)."""
    return "models--" + (f"{vendor}--{model}" if vendor else model)


class HfRuntime:
    """A Hugging Face hub cache (``HF_HUB_CACHE``): blobs, snapshot links, then the refs."""

    name = "hf"

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def wants(self, artifact_type: str) -> bool:
        return artifact_type in ("safetensors", "gguf")

    def check(self, job: Job) -> None:
        pass  # the job parsed its names; hf takes any of them

    async def install(self, job: Job) -> Installed:
        a = job.artifact
        repo = self.cache_dir / hf_repo_folder(job.vendor, job.model)
        commit = Digest.parse(a["digest"]).hex[:40]  # server/hf/index.py commit_id: the mirror's commit id
        snapshot = repo / "snapshots" / commit
        for f in job.own_files:
            rel = safe_relative(f.path, a["digest"])
            blob = await job.blob(f)
            await asyncio.to_thread(link_into, blob, repo / "blobs" / f.digest.hex)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(repo / "blobs" / f.digest.hex, link.parent)
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        refs = [repo / "refs" / job.version, repo / "refs" / "main"]
        for ref in refs:
            await asyncio.to_thread(write_file, ref, commit.encode())  # no trailing newline, as huggingface_hub writes
        logger.info("hf: installed %s at %s (commit %s, refs %s and main)", a["digest"], snapshot, commit,
                    job.version)
        return Installed(self.name, job.model_version_id, a["digest"], (str(snapshot), str(refs[0])))


class FilesRuntime:
    """A plain folder per model version, for engines that take a path (llama.cpp ``-m``, vLLM ``--model``)."""

    name = "files"

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir

    def wants(self, artifact_type: str) -> bool:
        return True

    def check(self, job: Job) -> None:
        pass  # the job parsed its names; a folder takes any of them

    async def install(self, job: Job) -> Installed:
        a = job.artifact
        folder = self.files_dir / (job.vendor or DEFAULT_NAMESPACE) / job.model / job.version
        paths = []
        for f in job.own_files:
            dest = folder / safe_relative(f.path, a["digest"])
            await asyncio.to_thread(link_into, await job.blob(f), dest)
            paths.append(str(dest))
        logger.info("files: installed %s at %s (%d files)", a["digest"], folder, len(paths))
        return Installed(self.name, job.model_version_id, a["digest"], tuple(paths))


def make_runtimes(names: Iterable[str], *, cache_host: str, ollama_models: Path | None, ollama_alias: bool,
                  hf_cache: Path | None, files_dir: Path | None) -> list[Runtime]:
    """The runtimes named, each with its folder; a runtime without one is a configuration error."""
    made: list[Runtime] = []
    for name in names:
        if name == "ollama":
            models = ollama_models or (Path(os.environ["OLLAMA_MODELS"]) if os.environ.get("OLLAMA_MODELS")
                                       else Path.home() / ".ollama" / "models")
            made.append(OllamaRuntime(models, cache_host, ollama_alias))
        elif name == "hf":
            made.append(HfRuntime(hf_cache or _default_hf_cache()))
        elif name == "files":
            if files_dir is None:
                raise InvalidInput("runtime files needs a folder: pass --files-dir DIR (or files_dir in the config)")
            made.append(FilesRuntime(files_dir))
        else:
            raise InvalidInput(f"unknown runtime {name!r}: expected ollama, hf or files")
    return made


def _default_hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"

