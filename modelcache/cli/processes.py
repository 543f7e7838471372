"""The long-running processes: run, serve, syncd, fetchd."""

from __future__ import annotations

import asyncio

from ..config import Settings
from . import _host_options, main

# -- processes ----------------------------------------------------------------


@main.command()
@_host_options("listen")
def run(settings: Settings) -> None:
    """Run the server, the import daemon and the downloads in one process (embedded PostgreSQL when no dsn)."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=True, fetch=True))


@main.command()
@_host_options("listen")
def serve(settings: Settings) -> None:
    """Run the HTTP server only."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=False))


@main.command()
@_host_options("url")
def syncd(settings: Settings) -> None:
    """Run the import-folder daemon only."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=False, watch=True))


@main.command()
@_host_options("url")
def fetchd(settings: Settings) -> None:
    """Run the downloads only (for sites that want upstream traffic in a process of its own)."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=False, watch=False, fetch=True))
