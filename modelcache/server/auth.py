"""Who is asking, from the Authorization header or the client's address; answered from memory."""

from __future__ import annotations

import datetime as dt
import ipaddress

from aiohttp import web

from ..auth import Subject, secret_sha256
from ..errors import Unauthorized
from .keys import CATALOG, SETTINGS, SUBJECT


def authenticate(request: web.Request) -> Subject:
    """The request's subject; raises Unauthorized with a reason the client can act on."""
    header = request.headers.get("Authorization")
    if header is None:
        if _trusted(request):
            request[SUBJECT] = Subject("anonymous", request.remote)
            return request[SUBJECT]
        raise Unauthorized("a Bearer token is required (Authorization: Bearer <token>)")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    entry = request.app[CATALOG].token(secret_sha256(secret.strip()))
    if entry is None:
        raise Unauthorized("unknown or revoked token")
    if entry.expired(dt.datetime.now(dt.timezone.utc)):
        raise Unauthorized(f"token {entry.name} expired at {entry.expires_at.isoformat()}")
    subject = Subject("token", entry.name, entry.role)
    request[SUBJECT] = subject
    return subject


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
