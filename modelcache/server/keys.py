"""Typed application keys: everything the handlers share, in one place."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..db import Database
from ..store import BlobStore
from .catalog import Catalog

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
STORE = web.AppKey("store", BlobStore)
CATALOG = web.AppKey("catalog", Catalog)
