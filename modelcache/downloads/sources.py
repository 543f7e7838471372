"""The configured upstream sources, and where a reference of one points.

A source is configured in the static config (``[sources.<id>]``), never in the
database; its token is read from the environment variable or file the config
names, when a transfer starts, and is never logged or stored.

A reference is parsed by its source's kind (:meth:`Source.parse`) when it is
asked for, and resolved by :func:`resolve` when its transfer starts into a
:class:`Plan`: the files to fetch, each with its URL and the size and digest
the upstream declares, and the shape they make (one file, a folder, an Ollama
model). The references of each kind:

    http          a path below the source's URL          org/model-q4.gguf
    modelcache    an artifact of another cache's /v1      sha256:<hex>  or  [vendor/]model:version
    huggingface   a Hub repository at a revision          org/name[@revision][?include=PATTERN[,PATTERN...]]
    ollama        a model of an OCI/Ollama registry       [namespace/]model[:tag]

Metadata is read through the same guarded session as the bytes (every hop
checked by the policy, the CA bundle and the proxy honoured); the Hub's API
is not followed off the source's own origin.
"""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.parse
from dataclasses import dataclass

from ..config import Settings, SourceSettings
from ..digest import Digest
from ..errors import ConfigError, InvalidInput, NotFound
from ..formats.ollama import DEFAULT_NAMESPACE, DEFAULT_TAG
from ..names import parse_model_name, parse_vendor, parse_version

# a reference of the http kind: a relative path below the source's base URL
_SEGMENT = re.compile(r"[A-Za-z0-9._~+=,@-]+")
MAX_REFERENCE = 1000
# the Hub's repository names (org/name) and revisions (a branch, a tag or a commit; refs/pr/1 too)
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HUB_REVISION = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}")
_HUB_PATTERN = re.compile(r"[A-Za-z0-9._/*?\[\]-]{1,200}")
# Ollama's name parts (types/model/name.go)
_OLLAMA_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")


@dataclass(frozen=True)
class ArtifactRef:
    """A ``modelcache`` reference: an artifact digest, or a model version (with the type when it holds several)."""

    digest: Digest | None = None
    vendor: str | None = None
    model: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.digest is not None:
            return str(self.digest)
        return f"{self.vendor + '/' if self.vendor else ''}{self.model}:{self.version}"


@dataclass(frozen=True)
class HubRef:
    """A ``huggingface`` reference: a repository at a revision, optionally only the files matching ``include``."""

    repo: str
    revision: str = "main"
    include: tuple[str, ...] = ()

    def wants(self, path: str) -> bool:
        """The file is part of the download: no include patterns, or one matches (fnmatch, as the Hub's
        ``allow_patterns``: ``*`` crosses ``/``, and a pattern ending in ``/`` takes the folder)."""
        return not self.include or any(
            fnmatch.fnmatchcase(path, p + "*" if p.endswith("/") else p) for p in self.include)

    def __str__(self) -> str:
        include = f"?include={','.join(self.include)}" if self.include else ""
        return f"{self.repo}@{self.revision}{include}"


@dataclass(frozen=True)
class OllamaRef:
    """An ``ollama`` reference: ``[namespace/]model[:tag]`` of the registry at the source's URL."""

    namespace: str
    model: str
    tag: str

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.model}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}:{self.tag}"


@dataclass(frozen=True)
class Source:
    settings: SourceSettings

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def base_url(self) -> str:
        return self.settings.url

    def url_for(self, reference: str) -> str:
        """The URL of ``reference`` (a relative path such as ``org/model-q4.gguf``) below the base URL."""
        return self.base_url + parse_reference(reference)

    def url_of(self, path: str) -> str:
        """A path below the base URL, each segment quoted (the path is ours, or parsed already)."""
        return self.base_url + "/".join(urllib.parse.quote(seg, safe=":@~") for seg in path.split("/"))

    def parse(self, reference: str) -> str | ArtifactRef | HubRef | OllamaRef:
        """``reference`` read as this source's kind expects it; InvalidInput says the form when it is not."""
        if not isinstance(reference, str) or not 1 <= len(reference) <= MAX_REFERENCE:
            raise InvalidInput(f"invalid reference: expected 1-{MAX_REFERENCE} characters")
        parse = {"http": parse_reference, "modelcache": parse_artifact_ref, "huggingface": parse_hub_ref,
                 "ollama": parse_ollama_ref}[self.kind]
        return parse(reference)

    def token(self) -> str | None:
        """The bearer token the config names, read now; an error names the key, never the value."""
        s = self.settings
        if s.token_env:
            value = os.environ.get(s.token_env)
            if not value:
                raise ConfigError(f"sources.{s.id}.token_env names {s.token_env}, which is not set in the "
                                  "environment of this process")
            return value.strip()
        if s.token_file:
            try:
                value = s.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"sources.{s.id}.token_file = {str(s.token_file)!r}: cannot read it "
                                  f"({exc.strerror})") from None
            if not value:
                raise ConfigError(f"sources.{s.id}.token_file = {str(s.token_file)!r} is empty")
            return value
        return None


def parse_reference(reference: str) -> str:
    """A reference of the http kind: path segments of safe characters; never absolute, never ``..``."""
    ok = isinstance(reference, str) and 1 <= len(reference) <= MAX_REFERENCE and all(
        _SEGMENT.fullmatch(s) and s not in (".", "..") for s in reference.split("/"))
    if not ok:
        shown = reference[:100] if isinstance(reference, str) else reference
        raise InvalidInput(f"invalid reference {shown!r}: expected a path relative to the source's URL, such as "
                           "org/model-q4.gguf (segments of A-Z a-z 0-9 . _ ~ + = , @ -, no '..')")
    return "/".join(urllib.parse.quote(s, safe="~+=,@-._") for s in reference.split("/"))


def parse_artifact_ref(reference: str) -> ArtifactRef:
    """``sha256:<hex>`` or ``[vendor/]model:version``, for a source of kind modelcache."""
    if reference.startswith("sha256:"):
        return ArtifactRef(digest=Digest.parse(reference))
    name, colon, version = reference.rpartition(":")
    vendor, slash, model = name.rpartition("/")
    try:
        if not colon or not name:
            raise InvalidInput("no ':version'")
        return ArtifactRef(vendor=parse_vendor(vendor) if slash else None, model=parse_model_name(model),
                           version=parse_version(version))
    except InvalidInput as exc:
        raise InvalidInput(f"invalid reference {reference[:100]!r} for a modelcache source: expected "
                           f"sha256:<hex> or [vendor/]model:version ({exc.detail})") from None


def parse_hub_ref(reference: str) -> HubRef:
    """``org/name[@revision][?include=PATTERN[,PATTERN...]]``, for a source of kind huggingface."""
    expected = InvalidInput(
        f"invalid reference {reference[:100]!r} for a huggingface source: expected "
        "org/name[@revision][?include=PATTERN[,PATTERN...]], e.g. acme/tiny@main?include=*.safetensors,*.json")
    repo, _, query = reference.partition("?")
    repo, at, revision = repo.partition("@")
    include: tuple[str, ...] = ()
    if query:
        key, _, patterns = query.partition("=")
        include = tuple(patterns.split(","))
        if key != "include" or not all(_HUB_PATTERN.fullmatch(p) for p in include):
            raise expected
    parts = repo.split("/")
    if len(parts) != 2 or not all(_HUB_NAME.fullmatch(p) and ".." not in p for p in parts):
        raise expected
    if at and (not _HUB_REVISION.fullmatch(revision) or ".." in revision):
        raise expected
    return HubRef(repo, revision if at else "main", include)


def parse_ollama_ref(reference: str) -> OllamaRef:
    """``[namespace/]model[:tag]``, for a source of kind ollama (the registry is the source's URL)."""
    name, colon, tag = reference.rpartition(":") if ":" in reference else (reference, "", DEFAULT_TAG)
    namespace, slash, model = name.rpartition("/")
    namespace = namespace if slash else DEFAULT_NAMESPACE
    if not all(_OLLAMA_PART.fullmatch(p) and ".." not in p for p in (namespace, model, tag)):
        raise InvalidInput(f"invalid reference {reference[:100]!r} for an ollama source: expected "
                           "[namespace/]model[:tag], e.g. library/llama3:8b (the registry is the source's URL)")
    return OllamaRef(namespace, model, tag)


def find_source(settings: Settings, source_id: str) -> Source:
    source = settings.sources.get(source_id)
    if source is None:
        known = ", ".join(sorted(settings.sources)) or "none are configured"
        raise NotFound(f"no source {source_id!r} is configured (known: {known}); sources are [sources.<id>] "
                       "tables in the config file")
    return Source(source)
