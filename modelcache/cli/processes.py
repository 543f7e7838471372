"""The long-running processes: run, serve, syncd."""

from __future__ import annotations

import asyncio

from ..config import Settings
from . import _host_options, main

# -- processes ----------------------------------------------------------------


@main.command()
@_host_options(with_listen=True)
def run(settings: Settings) -> None:
    """Run the server and the import daemon in one process (embedded PostgreSQL when no dsn)."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=True))


@main.command()
@_host_options(with_listen=True)
def serve(settings: Settings) -> None:
    """Run the HTTP server only."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=True, watch=False))


@main.command()
@_host_options(with_listen=False)
def syncd(settings: Settings) -> None:
    """Run the import-folder daemon only."""
    from ..runtime import run as run_process

    asyncio.run(run_process(settings, serve=False, watch=True))


