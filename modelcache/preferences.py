"""Policy: preferences kept in PostgreSQL (scope ``system``), typed, versioned and audited."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .auth import Subject
from .db import Database, audit, preferences
from .errors import Conflict, InvalidInput

logger = logging.getLogger(__name__)


MAX_BYTES = 2**63 - 1  # what a signed 64-bit byte count (PostgreSQL bigint, a Prometheus sample) holds


def _byte_count(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
        raise ValueError(f"expected a number of bytes: an integer from 0 to {MAX_BYTES}")


def _boolean(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")


def _policy(value: Any) -> None:
    if value not in ("lru", "largest_first", "none"):
        raise ValueError("expected one of 'lru', 'largest_first', 'none'")


def _sources(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected an array of source ids or URL prefixes (non-empty strings)")


@dataclass(frozen=True)
class Key:
    value_type: str  # number, string, array, boolean (CyNodeAI's value_type)
    default: Any
    check: Callable[[Any], None]
    description: str


# The one place preference keys, their types and defaults live.
KEYS: dict[str, Key] = {
    "models.cache.max_bytes": Key("number", 100 * 1024**3, _byte_count,
                                  "Most bytes of blobs the cache holds once an import or download completes."),
    "models.cache.evict_policy": Key("string", "lru", _policy,
                                     "lru, largest_first, or none (refuse new content when full)."),
    "models.download.allowed_sources": Key("array", [], _sources,
                                           "Source ids or URL prefixes downloads may come from."),
    "models.download.require_user_approval": Key("boolean", True, _boolean,
                                                 "Downloads wait for an admin's approval."),
    "models.download.pull_through": Key("boolean", False, _boolean,
                                        "A /v2 or /hf miss asks an allowed source for it: a download request "
                                        "made by whoever missed."),
    "models.nodes.prefer_local_cache": Key("boolean", True, _boolean,
                                           "Selection prefers nodes that already have the model."),
    "models.import.auto_promote": Key("boolean", True, _boolean,
                                      "Imported artifacts are promoted (visible to nodes) at once."),
}


def parse_key(key: str) -> Key:
    if key not in KEYS:
        raise InvalidInput(f"unknown preference {key!r}; known: {', '.join(KEYS)}")
    return KEYS[key]


async def effective(db: Database) -> dict[str, Any]:
    """Every known key's value: the stored one, else the default."""
    return {key: entry["value"] for key, entry in (await entries(db)).items()}


async def entries(db: Database) -> dict[str, dict]:
    """Every known key with its value, version, who set it and when (defaults have version 0)."""
    async with db.connection() as conn:
        stored = await preferences.system_preferences(conn)
    out = {}
    for key, spec in KEYS.items():
        row = stored.get(key)
        if row is not None and not _valid(spec, row["value"]):
            # stored before the value's bounds were checked: the default holds until it is set again
            logger.warning("preference %s holds %s, which is not a valid value; using the default %r",
                           key, _shown(row["value"]), spec.default)
            row = None
        if row is not None and row["value_type"] == spec.value_type:
            out[key] = {"key": key, "value": row["value"], "value_type": spec.value_type, "version": row["version"],
                        "updated_at": row["updated_at"], "updated_by": row["updated_by"], "default": False}
        else:
            out[key] = {"key": key, "value": spec.default, "value_type": spec.value_type, "version": 0,
                        "updated_at": None, "updated_by": None, "default": True}
    return out


def _valid(spec: Key, value: Any) -> bool:
    try:
        spec.check(value)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


async def set_preference(db: Database, key: str, value: Any, subject: Subject, *,
                         expected_version: int | None = None, reason: str | None = None) -> dict:
    """Store a typed value; a stale ``expected_version`` is a Conflict. Audited with old and new value."""
    spec = parse_key(key)
    try:
        spec.check(value)
    except ValueError as exc:
        raise InvalidInput(f"preference {key} = {_shown(value)}: {exc}") from None
    async with db.transaction() as conn:
        old = await preferences.get_preference(conn, key, for_update=True)
        current = old["version"] if old else 0
        if expected_version is not None and expected_version != current:
            raise Conflict(f"preference {key} is at version {current}, not {expected_version}: "
                           "someone changed it; read it again and retry")
        row = await preferences.upsert_preference(conn, key, value, spec.value_type, str(subject), old)
        old_value = old["value"] if old else spec.default
        await preferences.preference_audit(conn, row["id"], old_value, value, str(subject), reason)
        await audit.audit(conn, subject, "preference.update", "preference", key, reason=reason,
                             details={"old_value": old_value, "new_value": value, "version": row["version"]})
    logger.info("preference %s changed from %r to %r (version %d) by %s%s", key, old_value, value, row["version"],
                subject, f": {reason}" if reason else "")
    return (await entries(db))[key]
