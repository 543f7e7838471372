"""Where a node puts a model so its engine finds it, and the one copy of each blob behind every layout.

A node keeps each blob once, in its own store, and hard-links it into every layout that wants it (a GGUF
is at once an Ollama layer, a Hugging Face snapshot file and a plain ``.gguf``)::

    <state_dir>/blobs/sha256/<hex>                        the node's one copy (read-only), pulled and verified
    <state_dir>/installed.json                            what the agent installed, to report at its next start

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
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from ..digest import Digest
from ..errors import InvalidInput
from ..formats.ollama import DEFAULT_HOST, DEFAULT_NAMESPACE, Manifest, ModelName, ModelsDir
from .pull import CacheClient, OnBytes, RemoteFile, safe_relative, target_of

logger = logging.getLogger(__name__)

DOCKER_MANIFEST_PATHS = {"gguf": ".ollama/docker-manifest.json", "ollama": "manifest"}


# -- the node's one copy of each blob ------------------------------------------------


class NodeStore:
    """``<state_dir>/blobs/sha256/<hex>``: a blob is there only once pulled and verified (renamed into place)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "blobs" / "sha256"

    def path_for(self, digest: Digest) -> Path:
        return self.root / digest.hex

    def has(self, digest: Digest, size: int) -> bool:
        try:
            return self.path_for(digest).stat().st_size == size
        except OSError:
            return False

    async def ensure(self, client: CacheClient, digest: Digest, size: int, progress: OnBytes | None = None) -> Path:
        """The blob's path here, pulled from the cache unless it already is here."""
        path = self.path_for(digest)
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
        shutil.copyfile(blob, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dest)


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
    def from_json(cls, doc: dict[str, Any]) -> "Installed":
        return cls(doc["runtime"], doc["model_version_id"], doc["artifact_digest"], tuple(doc["paths"]))


class Inventory:
    """``<state_dir>/installed.json``: what this node installed, per runtime and model version."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "installed.json"

    def load(self) -> list[Installed]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s (%s): starting with an empty inventory", self.path, exc)
            return []
        return [Installed.from_json(d) for d in doc.get("installed", [])]

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

    @property
    def vendor(self) -> str | None:
        return self.artifact.get("vendor") or None

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

    def names(self, artifact: dict[str, Any]) -> list[ModelName]:
        vendor = (artifact.get("vendor") or DEFAULT_NAMESPACE).lower()
        model, tag = artifact["model"].lower(), artifact["version"]
        names = [ModelName.parse(f"{self.cache_host}/{vendor}/{model}:{tag}")]
        if self.alias:
            names.append(ModelName.parse(f"{DEFAULT_HOST}/{DEFAULT_NAMESPACE}/{model}:{tag}"))
        return names

    async def install(self, job: Job) -> Installed:
        manifest_file = job.file(DOCKER_MANIFEST_PATHS[job.artifact["artifact_type"]])
        raw = await job.client.fetch_small(manifest_file.digest)
        manifest = Manifest.parse(raw, f"manifest {manifest_file.digest} of artifact {job.artifact['digest']}")
        for d in manifest.blobs:
            blob = await job.blob(RemoteFile(str(d.digest), d.digest, d.size, d.media_type))
            link_into(blob, self.models.root / "blobs" / f"sha256-{d.digest.hex}")
        paths = []
        for name in self.names(job.artifact):
            path = self.models.manifest_path(name)
            write_file(path, raw)  # last: the model appears whole
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

    async def install(self, job: Job) -> Installed:
        a = job.artifact
        repo = self.cache_dir / hf_repo_folder(job.vendor, a["model"])
        commit = Digest.parse(a["digest"]).hex[:40]  # server/hf/index.py commit_id: the mirror's commit id
        snapshot = repo / "snapshots" / commit
        for f in job.own_files:
            rel = safe_relative(f.path, a["digest"])
            blob = await job.blob(f)
            link_into(blob, repo / "blobs" / f.digest.hex)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(repo / "blobs" / f.digest.hex, link.parent)
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        refs = [repo / "refs" / a["version"], repo / "refs" / "main"]
        for ref in refs:
            write_file(ref, commit.encode())  # no trailing newline: huggingface_hub reads the file as is
        logger.info("hf: installed %s at %s (commit %s, refs %s and main)", a["digest"], snapshot, commit,
                    a["version"])
        return Installed(self.name, job.model_version_id, a["digest"], (str(snapshot), str(refs[0])))


class FilesRuntime:
    """A plain folder per model version, for engines that take a path (llama.cpp ``-m``, vLLM ``--model``)."""

    name = "files"

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir

    def wants(self, artifact_type: str) -> bool:
        return True

    async def install(self, job: Job) -> Installed:
        a = job.artifact
        folder = self.files_dir / (job.vendor or DEFAULT_NAMESPACE) / a["model"] / a["version"]
        paths = []
        for f in job.own_files:
            dest = folder / safe_relative(f.path, a["digest"])
            link_into(await job.blob(f), dest)
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

