"""``GET /metrics``: Prometheus text.

Traffic counters are counted in this process; stock figures (bytes used and
allowed, artifacts by state, imports, evictions, quarantines, download bytes)
are read from the registry at scrape time, so they are right whichever
process (server, daemon, CLI) did the work. While PostgreSQL is down the last
figures are served.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

from .. import preferences
from ..db import artifacts, audit, blobs, downloads
from ..errors import DatabaseUnavailable
from .keys import CATALOG, DATABASE, METRICS

logger = logging.getLogger(__name__)

DOWNLOAD_STATES = ("pending_approval", "queued", "running", "completed", "failed", "rejected", "cancelled")


class _RequestCounts:
    """``modelcache_http_requests_total`` by method and status: plain ints counted on the event loop and
    read at scrape time. A prometheus Counter takes a lock per increment, which cost every HEAD ~2 µs."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("modelcache_http_requests", "HTTP requests answered", labels=["method", "status"])
        for (method, status), n in sorted(self.counts.items()):
            family.add_metric([method, str(status)], n)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _RequestCounts()
        r.register(self.requests)
        self.bytes_served = Counter("modelcache_bytes_served", "Blob bytes sent to clients", registry=r)
        self.pulls_denied = Counter("modelcache_blob_pulls_denied", "Blob pulls refused (401, 403), by status",
                                    ["status"], registry=r)
        self.cache_used = Gauge("modelcache_cache_bytes_used", "Bytes of blobs present in the store", registry=r)
        self.cache_max = Gauge("modelcache_cache_bytes_max", "models.cache.max_bytes", registry=r)
        self.blobs = Gauge("modelcache_blobs", "Blobs the server knows, by state", ["state"], registry=r)
        self.artifacts = Gauge("modelcache_artifacts", "Artifacts by state", ["state"], registry=r)
        self.events = Gauge("modelcache_events", "Audited events so far, by action and outcome",
                            ["action", "outcome"], registry=r)
        self.download_bytes = Gauge("modelcache_download_bytes", "Bytes fetched by user-directed downloads",
                                    registry=r)
        self.downloads = Gauge("modelcache_downloads", "User-directed downloads, by state", ["state"], registry=r)

    def count(self, method: str, status: int) -> None:
        counts = self.requests.counts
        counts[method, status] = counts.get((method, status), 0) + 1

    async def refresh(self, app: web.Application) -> None:
        catalog = app[CATALOG]
        for state, n in catalog.count_by_state().items():
            self.blobs.labels(state).set(n)
        try:
            db = app[DATABASE]
            prefs = await preferences.effective(db)
            async with db.connection(timeout=1) as conn:
                used = await blobs.cache_usage(conn)
                by_state = await artifacts.counts_by_state(conn)
                events = await audit.event_counts(conn)
                downloaded = await audit.download_bytes(conn)
                download_states = await downloads.counts_by_state(conn)
        except DatabaseUnavailable as exc:
            logger.debug("metrics from the registry unavailable: %s", exc.detail)
            return
        self.cache_used.set(used)
        self.cache_max.set(prefs["models.cache.max_bytes"])
        for state in ("staged", "promoted", "evicted", "quarantined"):
            self.artifacts.labels(state).set(by_state.get(state, 0))
        for (action, outcome), n in events.items():
            self.events.labels(action, outcome or "").set(n)
        self.download_bytes.set(downloaded)
        for state in DOWNLOAD_STATES:
            self.downloads.labels(state).set(download_states.get(state, 0))


async def serve_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await asyncio.wait_for(metrics.refresh(request.app), 5)
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
