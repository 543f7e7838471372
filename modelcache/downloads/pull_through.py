"""Pull-through: a ``/v2`` or ``/hf`` miss becomes a download request instead of a bare 404.

With the preference ``models.download.pull_through`` on, a miss (nothing of that name and version
in the cache, in any state) on

    /v2/<ns>/<model>/manifests/<tag>                  vendor <ns> (none for library), model, version <tag>
    /hf/api/models/<org>/<name>[/revision/<rev>]      vendor <org>, model <name>, version <rev>
    /hf/api/models/<org>/<name>/refs                  (llama.cpp's -hf starts here)
    /hf/api/models/<org>/<name>/tree/<rev>[/<path>]   (``main`` when none is named: the version is
    /hf/<org>/<name>/resolve/<rev>/<path>              ``main``, what the upstream's main was then)

is asked of one source: the first entry of ``models.download.allowed_sources`` naming a configured
source of a kind that serves the protocol (``/v2``: ``ollama``, as ``<ns>/<model>:<tag>`` from the
source's own ``/v2``, or ``modelcache``, as ``[vendor/]model:version`` from its ``/v1``, keeping the
artifact's type; ``/hf``: ``huggingface``, as ``org/name@rev``). No allowed source of a fitting kind:
the plain 404.

The request is :func:`~.requests.request`'s, made by the subject that missed (audited as
``model_download.request`` with ``details.pull_through``), under the same policy checks, and run by
the same workers. Concurrent and repeated misses find the one open request (a lock per source and
reference in the registry, so across processes too). Then the miss is answered:

- pending approval: at once, a 404 saying it awaits approval as download ``<id>``;
- queued or running: the client's request waits up to ``downloads.pull_through_wait_seconds`` for
  the protocol's index to serve it (small repos are answered from the freshly filled cache), else a
  404 saying it is being fetched as download ``<id>``, retry;
- failed (within ``MISS_REMEMBERED_SECONDS``), or the upstream failing while retrying (an upstream
  down or answering 429: the worker writes why it asks again to the row within a second, during the
  metadata lookup too): 503 at once, naming the download and the upstream's error, rather than after
  the whole wait; the download goes on retrying. Rejected or cancelled: a 404 saying so;
- completed (within ``MISS_REMEMBERED_SECONDS``): the miss came in the instant before the index held
  what it brought, so it waits for the index rather than asking for the same content again.

Only a miss reads the database here; what is cached is answered from memory as before, whether
the upstream is up or not. While the download runs in this process, ``early`` may answer before it
completes: a ``/v2`` miss gets the registry's manifest once the plan has it, and the blob GETs that
follow stream the bytes as they arrive (``inflight.py``). ``/hf/.../refs`` misses like the model info.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

from .. import preferences
from ..auth import Subject
from ..config import Settings
from ..db import Database
from ..errors import DatabaseUnavailable, InvalidInput, ModelcacheError, NotFound
from ..formats.ollama import DEFAULT_NAMESPACE
from ..names import parse_model_name, parse_vendor, parse_version
from . import requests
from .policy import ALLOWED_SOURCES, allowed_in_order
from .sources import Source

logger = logging.getLogger(__name__)

T = TypeVar("T")

# the source kinds that can fill a miss of each protocol
KINDS = {"v2": ("ollama", "modelcache"), "hf": ("huggingface",)}
POLL_SECONDS = 0.25  # how often a waiting miss looks at its download's row
INDEX_GRACE_SECONDS = 3.0  # how long after completion the index may take to follow the new artifact


class UpstreamFailing(ModelcacheError):
    """The download a miss maps to failed, or its upstream is failing while it is asked again."""

    status = 503
    title = "Upstream unavailable"
    code = "UNAVAILABLE"


@dataclass(frozen=True)
class Miss:
    """What a client asked for and the cache lacks, as a model version: ``vendor/model:version``."""

    protocol: str  # v2 or hf
    vendor: str | None
    model: str
    version: str

    @classmethod
    def of_v2(cls, namespace: str, model: str, tag: str) -> "Miss | None":
        """``<ns>/<model>:<tag>``; None when the names are not model names (then there is nothing to ask)."""
        return cls._parsed("v2", None if namespace == DEFAULT_NAMESPACE else namespace, model, tag)

    @classmethod
    def of_hf(cls, vendor: str | None, name: str, revision: str) -> "Miss | None":
        """``<org>/<name>`` at a revision; None for a repository without an org (the Hub has none)."""
        return cls._parsed("hf", vendor, name, revision) if vendor else None

    @classmethod
    def _parsed(cls, protocol: str, vendor: str | None, model: str, version: str) -> "Miss | None":
        try:
            return cls(protocol, parse_vendor(vendor), parse_model_name(model), parse_version(version))
        except InvalidInput:
            return None

    def reference(self, kind: str) -> str:
        """The reference a source of ``kind`` is asked for (``sources.py`` reads it)."""
        if kind == "ollama":
            return f"{self.vendor or DEFAULT_NAMESPACE}/{self.model}:{self.version}"
        if kind == "huggingface":
            return f"{self.vendor}/{self.model}@{self.version}"
        return str(self)  # modelcache: [vendor/]model:version

    def __str__(self) -> str:
        return f"{self.vendor + '/' if self.vendor else ''}{self.model}:{self.version}"


def pick_source(settings: Settings, allowed: list[str], protocol: str) -> Source | None:
    """The first allowed source of a kind that serves ``protocol``, in the preference's order."""
    configured = [Source(s) for s in settings.sources.values()]
    return next((s for s in allowed_in_order(configured, allowed) if s.kind in KINDS[protocol]), None)


async def serve_miss(db: Database, settings: Settings, miss: Miss, subject: Subject, lookup: Callable[[], T],
                     missing: NotFound, early: Callable[[uuid.UUID], T | None] | None = None) -> T:
    """Answer a miss through a download: ``lookup()`` (the protocol's index, raising NotFound while the
    content is not there) once the download filled the cache, or raise ``missing``'s kind of 404 (or
    :class:`UpstreamFailing`) saying which download and what to do. ``missing`` as it is when pull-through
    is off or no source fits. ``early(download_id)``: an answer before the download completed (from what
    this process's running download already knows, ``inflight.py``), or None."""
    try:
        prefs = await preferences.effective(db)
    except DatabaseUnavailable as exc:
        logger.warning("pull-through of %s not asked: %s", miss, exc.detail)
        raise missing from None
    if not prefs[requests.PULL_THROUGH]:
        raise missing
    source = pick_source(settings, prefs[ALLOWED_SOURCES], miss.protocol)
    if source is None:
        raise missing
    req = requests.DownloadRequest.parse(source.id, miss.reference(source.kind), miss.model, miss.version,
                                         miss.vendor)
    row = await requests.request(db, settings, req, subject, pull_through=True)
    return await _wait(db, settings, miss, row, lookup, missing, early)


async def _wait(db: Database, settings: Settings, miss: Miss, row: dict, lookup: Callable[[], T],
                missing: NotFound, early: Callable[[uuid.UUID], T | None] | None) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.downloads.pull_through_wait_seconds
    completed_at = None
    while True:
        try:
            return lookup()
        except NotFound as exc:
            absent = exc
        what = f"{miss} is not in the cache; download {row['id']} from {row['source']}"
        state = row["state"]
        if state == "pending_approval":
            raise type(missing)(f"{what} is awaiting an admin's approval (modelcache approve {row['id']}); "
                                "pull again once it is approved")
        if state == "failed":
            raise UpstreamFailing(f"{what} failed: {row['error']}; pull again later to ask once more")
        if state in ("rejected", "cancelled"):
            raise type(missing)(f"{what} was {state}" + (f": {row['reason']}" if row["reason"] else ""))
        if state == "running" and row["error"]:
            raise UpstreamFailing(f"{what} is waiting for the upstream, which fails ({row['error']}); "
                                  "retry later")
        if early is not None and state == "running" and (answer := early(row["id"])) is not None:
            return answer
        now = loop.time()
        if state == "completed":
            completed_at = completed_at if completed_at is not None else now
            if now - completed_at > INDEX_GRACE_SECONDS:
                raise absent  # completed, and still not served to this subject: the index's own answer
        if now >= deadline:
            raise type(missing)(f"{what} is being fetched ({_progress(row)}); retry in a while")
        await asyncio.sleep(POLL_SECONDS)
        row = await requests.get(db, row["id"])


def _progress(row: dict) -> str:
    if row["state"] != "running":
        return row["state"]
    total = f" of {row['bytes_total']}" if row["bytes_total"] is not None else ""
    return f"{row['bytes_done']}{total} bytes so far"
