"""Policy: preferences kept in PostgreSQL (scope ``system``), with their types and defaults."""

from __future__ import annotations

from typing import Any

from .db import registry
from .db.pool import Database

# key -> (value_type, default). The one place preference defaults live.
KEYS: dict[str, tuple[str, Any]] = {
    "models.cache.max_bytes": ("number", 100 * 1024**3),
    "models.cache.evict_policy": ("string", "lru"),
    "models.download.allowed_sources": ("array", []),
    "models.download.require_user_approval": ("boolean", True),
    "models.nodes.prefer_local_cache": ("boolean", True),
    "models.import.auto_promote": ("boolean", True),
}


async def effective(db: Database) -> dict[str, Any]:
    """Every known key's value: the stored one, else the default."""
    async with db.connection() as conn:
        stored = await registry.system_preferences(conn)
    values = {key: default for key, (_, default) in KEYS.items()}
    for key, row in stored.items():
        if key in KEYS and row["value_type"] == KEYS[key][0]:
            values[key] = row["value"]
    return values
