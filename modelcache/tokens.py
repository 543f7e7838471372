"""Minting, listing and revoking API tokens (the bootstrap CLI and, later, the API)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid

from .auth import Role, Subject, new_secret, parse_token_name, secret_sha256
from .db import Database, audit, tokens
from .errors import InvalidInput, NotFound

logger = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_LIFETIME = 3650 * 86400


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w``."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise InvalidInput(f"invalid duration {text!r}: expected a positive number and a unit, such as 90s, 12h or 30d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > _MAX_LIFETIME:
        raise InvalidInput(f"invalid duration {text!r}: at most 3650d (ten years)")
    return dt.timedelta(seconds=seconds)


def parse_node_id(text: str | None) -> uuid.UUID | None:
    if text in (None, ""):
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidInput(f"invalid node id {text!r}: expected a UUID") from None


async def create_token(db: Database, *, name: str, role: Role, subject: Subject,
                       node_id: uuid.UUID | None = None, expires_in: dt.timedelta | None = None) -> tuple[str, dict]:
    """Mint a token; returns the secret (shown once, never stored) and the stored row."""
    async with db.transaction() as conn:
        return await mint(conn, name=name, role=role, subject=subject, node_id=node_id, expires_in=expires_in)


async def mint(conn, *, name: str, role: Role, subject: Subject, node_id: uuid.UUID | None = None,
               expires_in: dt.timedelta | None = None) -> tuple[str, dict]:
    """:func:`create_token` inside the caller's transaction (node registration mints one with its row)."""
    name = parse_token_name(name)
    secret = new_secret()
    expires_at = dt.datetime.now(dt.timezone.utc) + expires_in if expires_in else None
    row = await tokens.insert_token(conn, name=name, role=role.value, token_sha256=secret_sha256(secret),
                                    node_id=node_id, expires_at=expires_at, by=str(subject))
    await audit.audit(conn, subject, "api_token.create", "api_token", name,
                      details={"role": role.value, "node_id": str(node_id) if node_id else None,
                               "expires_at": expires_at.isoformat() if expires_at else None})
    logger.info("token %s created with role %s by %s", name, role.value, subject)
    return secret, row


async def revoke_token(db: Database, name: str, subject: Subject) -> dict:
    async with db.transaction() as conn:
        row = await tokens.revoke_token(conn, name)
        if row is None:
            raise NotFound(f"no token named {name!r}")
        await audit.audit(conn, subject, "api_token.revoke", "api_token", name)
    logger.info("token %s revoked by %s", name, subject)
    return row


async def list_tokens(db: Database, *, limit: int, cursor: str | None) -> tuple[list[dict], str | None]:
    """One page of tokens, oldest first (revoked ones too: node re-registration leaves one each time)."""
    async with db.connection() as conn:
        return await tokens.list_tokens(conn, limit=limit, cursor=cursor)


async def all_tokens(db: Database) -> list[dict]:
    """Every token, oldest first: the bootstrap CLI's listing and the first-token hint."""
    async with db.connection() as conn:
        return await tokens.all_tokens(conn)
