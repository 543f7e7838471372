"""Who is asking, from the Authorization header or the client's address; answered from memory."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
from dataclasses import dataclass

from aiohttp import web

from ..auth import Subject, secret_sha256
from ..errors import Unauthorized
from .catalog import Catalog, TokenEntry
from .keys import CATALOG, SETTINGS, SUBJECT

# What the Authorization headers seen last resolved to: a client sends the same header with every
# request, and parsing it, hashing its secret (sha256) and building the subject each time was a
# measurable part of a HEAD. The token itself is still looked up in the catalog on every request (a
# revoked or reloaded token is seen at once); only while the catalog holds the very same entry is
# the subject reused. Bounded, so a flood of made-up secrets only churns it.
_HEADERS_KEPT = 256


@dataclass(slots=True)
class _Seen:
    token_sha256: str
    basic: bool  # the secret came as HTTP Basic's password (only accepted where ``basic`` is)
    entry: TokenEntry | None = None  # the catalog's entry the subject was made from
    subject: Subject | None = None


_seen: dict[str, _Seen] = {}


def authenticate(request: web.Request, *, basic: bool = False) -> Subject:
    """The request's subject; raises Unauthorized with a reason the client can act on.

    With ``basic``, HTTP Basic auth is accepted too, the token being the
    password (any user name): registry clients (skopeo, containerd, oras) send
    credentials that way.
    """
    header = request.headers.get("Authorization")
    if header is None:
        if _trusted(request):
            request[SUBJECT] = Subject("anonymous", request.remote)
            return request[SUBJECT]
        if basic:
            raise Unauthorized("credentials are required: a token as Bearer or as the password of HTTP Basic auth")
        raise Unauthorized("a Bearer token is required (Authorization: Bearer <token>)")
    request[SUBJECT] = subject = token_holder(request.app[CATALOG], header, basic=basic)
    return subject


def token_holder(catalog: Catalog, header: str, *, basic: bool = False) -> Subject:
    """The subject of an ``Authorization`` header's token, from the catalog; raises Unauthorized."""
    seen = _seen.get(header)
    if seen is None or (seen.basic and not basic):
        seen = _parse(header, basic)
    entry = catalog.token(seen.token_sha256)
    if entry is None:
        raise Unauthorized("unknown or revoked token")
    if entry.expires_at is not None and entry.expired(dt.datetime.now(dt.timezone.utc)):
        raise Unauthorized(f"token {entry.name} expired at {entry.expires_at.isoformat()}")
    subject = seen.subject
    if seen.entry is not entry or subject is None:
        subject = seen.subject = Subject("token", entry.name, entry.role, entry.node_id)
        seen.entry = entry
    return subject


def _parse(header: str, basic: bool) -> _Seen:
    """The secret of an Authorization header, hashed, and remembered for the next request."""
    scheme, _, credentials = header.partition(" ")
    if basic and scheme.lower() == "basic":
        seen = _Seen(secret_sha256(basic_password(credentials)), basic=True)
    elif scheme.lower() == "bearer" and credentials.strip():
        seen = _Seen(secret_sha256(credentials.strip()), basic=False)
    elif basic:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>' or "
                           "'Basic <base64 of user:token>'")
    else:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    if len(_seen) >= _HEADERS_KEPT:
        del _seen[next(iter(_seen))]  # the oldest
    _seen[header] = seen
    return seen


def basic_password(credentials: str) -> str:
    """The password of ``Basic base64(user:password)``; the user name is not looked at."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials: expected base64 of user:token") from None
    _, colon, password = decoded.partition(":")
    if not colon or not password:
        raise Unauthorized("Basic credentials carry no password: give the token as the password (any user name)")
    return password


def _trusted(request: web.Request) -> bool:
    networks = request.app[SETTINGS].server.trusted_networks
    if not networks or request.remote is None:
        return False
    try:
        address = ipaddress.ip_address(request.remote)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def token_subject(request: web.Request, name: str) -> Subject:
    """The subject of the live token named ``name``: for URLs signed for a token holder (see signing.py)."""
    now = dt.datetime.now(dt.timezone.utc)
    for entry in request.app[CATALOG].tokens.values():
        if entry.name == name:
            if entry.expired(now):
                raise Unauthorized(f"token {name}, for which this URL was signed, expired at "
                                   f"{entry.expires_at.isoformat()}")
            request[SUBJECT] = Subject("token", name, entry.role)
            return request[SUBJECT]
    raise Unauthorized(f"token {name}, for which this URL was signed, is revoked or unknown")
