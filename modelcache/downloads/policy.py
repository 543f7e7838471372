"""What a download may fetch, checked before any byte moves and again at every redirect hop.

Rules, each named in the refusal (audited, and answered as problem+json):

- ``models.download.allowed_sources``: the source's id, or a URL prefix its base
  URL starts with, must be in the preference;
- ``redirect``: a hop must be http or https, and at most ``downloads.max_redirects`` are followed;
  a metadata request (the Hub's API) is not followed off the configured source's own origin;
- ``internal_address``: a hop whose host is, or resolves to, a loopback,
  link-local (cloud metadata included), private, shared, multicast or reserved
  address is refused, unless the configured source's own URL points at that
  host (an on-site mirror the admin configured) or an allowed URL prefix names it.

Host names are checked where they are resolved, by :class:`GuardedResolver`
inside the HTTP connector, so the address checked is the address connected to
(a name cannot resolve to a public address for the check and a private one
for the connection). Through an ``HTTPS_PROXY`` only the proxy is connected to:
then names are left to the proxy and literal addresses are still checked.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
import urllib.request
from typing import Iterable

from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from ..errors import ModelcacheError
from .sources import Source

ALLOWED_SOURCES = "models.download.allowed_sources"

# beyond what ipaddress calls private: carrier-grade NAT, which clouds use for metadata services too
_EXTRA_INTERNAL = [ipaddress.ip_network("100.64.0.0/10")]


class PolicyRefused(ModelcacheError):
    """A download refused by a policy rule; ``rule`` names it."""

    status = 403
    title = "Refused by download policy"

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"download policy {rule}: {detail}")
        self.rule = rule


class InternalAddress(OSError):
    """Raised inside the connector's resolver; turned into :class:`PolicyRefused` by the transfer."""


def check_allowed(source: Source, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if source.id in allowed or any(_is_prefix(p) and source.base_url.startswith(p) for p in allowed):
        return
    raise PolicyRefused(ALLOWED_SOURCES, f"source {source.id!r} ({source.base_url}) is not allowed; allowed: "
                        f"{allowed or 'none'}; an admin adds it with `modelcache prefs set {ALLOWED_SOURCES} "
                        f"'[\"{source.id}\"]'`")


def allowed_in_order(sources: Iterable[Source], allowed: Iterable[str]) -> list[Source]:
    """The configured ``sources`` the preference allows (the rule of :func:`check_allowed`), in the
    preference's order: a source id where it stands, the sources under a URL prefix by id."""
    sources = sorted(sources, key=lambda s: s.id)
    found: list[Source] = []
    for entry in allowed:
        for source in sources:
            named = source.id == entry or (_is_prefix(entry) and source.base_url.startswith(entry))
            if named and source not in found:
                found.append(source)
    return found


def is_internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or any(ip in net for net in _EXTRA_INTERNAL))


class HopPolicy:
    """The hop rules for one transfer from ``source``; its hops are requested one after the other."""

    def __init__(self, source: Source, allowed: Iterable[str], max_redirects: int) -> None:
        self.source = source
        self.max_redirects = max_redirects
        # origins that may be internal: the configured source's own, and those of allowed URL prefixes
        self._trusted = {_origin(source.base_url)} | {_origin(p) for p in allowed if _is_prefix(p)}
        self.proxy_hosts = {_origin(url)[1] for url in urllib.request.getproxies().values() if "://" in url}
        self._hop_trusted = False  # the verdict on the hop being requested, for the resolver

    def check(self, url: str, hop: int, *, own_origin: bool = False) -> None:
        """Check one hop's URL before it is requested (a name is checked again when it is resolved).

        ``own_origin``: the hop must stay on the configured source's scheme, host and port (metadata,
        which a source's own API answers; bytes may be redirected to a CDN, metadata never)."""
        if hop > self.max_redirects:
            raise PolicyRefused("redirect", f"more than {self.max_redirects} redirects (downloads.max_redirects); "
                                f"the last pointed to {url}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyRefused("redirect", f"hop {hop} goes to {url!r}: only http and https URLs are followed")
        if own_origin and _origin(url) != _origin(self.source.base_url):
            raise PolicyRefused("redirect", f"hop {hop} goes to {url}: metadata is read from the configured "
                                f"source {self.source.base_url} only, never from a host it redirects to")
        self._hop_trusted = self.trusts(url)
        if self._hop_trusted:
            return
        host = parts.hostname.lower()
        literal = _literal(host)
        if (literal is not None and is_internal(literal)) or host == "localhost" or host.endswith(".localhost"):
            raise PolicyRefused("internal_address", f"hop {hop} goes to {url}, an internal address; only the "
                                f"configured source {self.source.base_url} may point at one")

    def trusts(self, url: str) -> bool:
        """The URL has the origin of the configured source or of an allowed URL prefix: it may be internal."""
        return _origin(url) in self._trusted

    def check_resolved(self, host: str, addresses: list[str]) -> None:
        """Called by the resolver: the hop being requested must resolve to public addresses unless trusted."""
        if self._hop_trusted or host.lower() in self.proxy_hosts:
            return
        internal = [a for a in addresses if is_internal(a)]
        if internal:
            raise InternalAddress(f"download policy internal_address: {host} resolves to an internal address "
                                  f"({', '.join(internal)}); only the configured source {self.source.base_url} "
                                  "may point at one")


class GuardedResolver(ThreadedResolver):
    """The connector's resolver: every name connected to is checked by the transfer's :class:`HopPolicy`."""

    def __init__(self, policy: HopPolicy) -> None:
        super().__init__()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        self._policy.check_resolved(host, [r["host"] for r in found])
        return found


def _is_prefix(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None
