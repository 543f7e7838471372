"""Who is asking: roles, subjects and token secrets.

Roles (DESIGN.md): ``admin`` may do everything; ``operator`` imports, requests
downloads, promotes, pins and evicts; ``node`` pulls promoted blobs and reports
its own availability; ``reader`` pulls promoted blobs and reads the registry.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import Enum

from .errors import InvalidInput

TOKEN_PREFIX = "mc_"


class Role(str, Enum):
    ADMIN = "admin"
    OPERATOR = "operator"
    NODE = "node"
    READER = "reader"

    @classmethod
    def parse(cls, text: str) -> "Role":
        try:
            return cls(text)
        except ValueError:
            raise InvalidInput(f"invalid role {text!r}: expected one of {', '.join(r.value for r in cls)}") from None

    @property
    def sees_staged(self) -> bool:
        """Staged (not yet promoted) blobs are for those who manage content, never for nodes."""
        return self in (Role.ADMIN, Role.OPERATOR)


@dataclass(frozen=True, slots=True)
class Subject:
    """The actor of an action, as written to the audit log."""

    type: str  # token, local, syncd, anonymous
    id: str | None
    role: Role | None = None
    node_id: str | None = None  # the node a node token is bound to

    @classmethod
    def local(cls) -> "Subject":
        """The operator at the cache host's shell (bootstrap verbs)."""
        return cls("local", getpass.getuser(), Role.ADMIN)

    def __str__(self) -> str:
        return f"{self.type}:{self.id}" if self.id else self.type

    def withheld(self, state: str) -> str | None:
        """Why this subject may not have content in ``state``, or None if it may: the one rule for every
        protocol. ``state`` is an artifact's (a blob is ``promoted`` when a promoted artifact holds it,
        else ``staged``); staged content is for those who manage content, never for nodes."""
        if state == "promoted":
            return None
        if state == "staged":
            if self.role is not None and self.role.sees_staged:
                return None
            return "is staged, not promoted: only admins and operators may read it"
        if state == "evicted":
            return "was evicted from the cache"
        return f"is {state}: it failed verification and is not served"


SYNCD = Subject("syncd", "syncd", Role.OPERATOR)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
TOKEN_NAME_PATTERN = f"^{_NAME.pattern}$"  # the same rule, for JSON schema


def parse_token_name(text: str) -> str:
    if not isinstance(text, str) or not _NAME.fullmatch(text):
        raise InvalidInput(f"invalid token name {text!r}: use 1-128 of A-Z a-z 0-9 . _ @ -, starting alphanumeric")
    return text


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    """Only this hash of a secret is stored or kept in memory."""
    return hashlib.sha256(secret.encode()).hexdigest()
