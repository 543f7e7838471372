"""Bytes served per hour over the last day, for the overview's chart.

The served-bytes counter (``modelcache_bytes_served``, counted in this process) has no history, so
a small ring keeps one number per hour for the last 24 hours: every ``SAMPLE_SECONDS`` the counter's
growth since the last look is added to the current hour. It is in memory: after a restart the chart
starts empty (the counter does too). Bytes *downloaded* need no ring: every download's bytes and
end time are rows in ``model_downloads`` (db/dashboard.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import AsyncIterator

from aiohttp import web

from ..keys import METRICS

HOURS = 24
SAMPLE_SECONDS = 30.0


def hour_of(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)


class ServedRing:
    def __init__(self) -> None:
        self.by_hour: dict[dt.datetime, float] = {}
        self._last: float | None = None

    def sample(self, total: float, now: dt.datetime) -> None:
        """Add the counter's growth since the last sample to ``now``'s hour; forget hours older than a day."""
        if self._last is not None and total >= self._last:
            hour = hour_of(now)
            self.by_hour[hour] = self.by_hour.get(hour, 0.0) + (total - self._last)
        self._last = total
        oldest = hour_of(now) - dt.timedelta(hours=HOURS - 1)
        for hour in [h for h in self.by_hour if h < oldest]:
            del self.by_hour[hour]


SERVED = web.AppKey("ui_served_ring", ServedRing)


def served_total(app: web.Application) -> float:
    return app[METRICS].registry.get_sample_value("modelcache_bytes_served_total") or 0.0


def sample(app: web.Application) -> None:
    app[SERVED].sample(served_total(app), dt.datetime.now(dt.timezone.utc))


async def ring_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample the counter while the app runs (``app[SERVED]`` is made in ``ui.setup``)."""
    sample(app)

    async def sample_forever() -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            sample(app)

    task = asyncio.create_task(sample_forever(), name="ui-served-ring")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def hours(now: dt.datetime) -> list[dt.datetime]:
    """The last 24 hour starts, oldest first, the current hour last."""
    last = hour_of(now)
    return [last - dt.timedelta(hours=HOURS - 1 - i) for i in range(HOURS)]
