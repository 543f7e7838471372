"""A registry's token auth (distribution's "token authentication"), for the ``ollama`` source kind.

A registry that wants a token answers 401 with::

    WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry.example",
                      scope="repository:library/llama3:pull"

and the client GETs the realm with ``service`` and ``scope`` as query parameters, gets
``{"token": ...}`` (or ``{"access_token": ...}``, the OAuth2 name) and asks the registry again with
``Authorization: Bearer <token>``. Tokens last minutes (Docker Hub's five); a layer may take hours,
so a 401 later in a download (a part, a resume, the next layer) asks the realm again, once per
request (:meth:`RegistryAuth.renew`, called by the Transfer).

Credentials, from the source's config:

    username + token_env/token_file   Basic <username:token> to the realm (an account and its password
                                      or access token, as ``docker login`` keeps them)
    token_env/token_file alone        the token sent as the Bearer itself to the registry (one issued
                                      out of band), and to the realm as a Bearer if the registry asks
    nothing                           an anonymous realm request (public models)

The realm is one more outbound hop, checked by the :class:`~.policy.HopPolicy` as a redirect is
(http or https; an internal address only where the configured source or an allowed URL prefix names
it). Credentials go further only where the policy trusts the origin: a realm elsewhere (Docker Hub's
``auth.docker.io`` for ``registry-1.docker.io``) gets them only once its URL prefix is in
``models.download.allowed_sources``; otherwise the download is refused (rule ``token_realm``) rather
than sending them, or going anonymous, without saying so. Neither credentials nor tokens are logged,
stored in the database, or put into an error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import urllib.parse

import aiohttp

from ..config import DownloadSettings
from .policy import HopPolicy, PolicyRefused
from .sources import Source
from .transfer import Transfer, UpstreamError, _shown

logger = logging.getLogger(__name__)

MAX_TOKEN_ANSWER = 1 << 20
# an auth-param of a challenge (RFC 9110 11.2): a name, "=", then a token or a quoted string (with \-escapes)
_PARAM = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')
_ESCAPE = re.compile(r"\\(.)")


def challenge_params(rest: str) -> dict[str, str]:
    """The parameters of a challenge after its scheme: ``realm="https://a/token",service=a`` →
    ``{"realm": "https://a/token", "service": "a"}``; names are lowercased, as they are case-insensitive."""
    return {name.lower(): _ESCAPE.sub(r"\1", quoted) if token == "" else token
            for name, quoted, token in _PARAM.findall(rest)}


class RegistryAuth:
    """The Bearer token of one download from a registry: asked of the realm when the registry challenges."""

    def __init__(self, session: aiohttp.ClientSession, policy: HopPolicy, source: Source, repository: str,
                 settings: DownloadSettings | None = None) -> None:
        self.session, self.policy, self.source, self.settings = session, policy, source, settings
        self.repository = repository
        self.username = source.settings.username
        self.secret = source.token()  # read now (an unset variable fails the download, naming it)
        # sent to the registry before any challenge: a configured bearer token, not an account's password
        self.token: str | None = None if self.username else self.secret
        self._lock = asyncio.Lock()

    async def renew(self, challenge: str | None, sent: str | None) -> None:
        """The registry answered 401 to a request that carried ``sent``: ask its realm for a token,
        unless another request of this download already did since (the parts of a file share one)."""
        async with self._lock:
            if self.token is not None and self.token != sent:
                return
            self.token = await self._ask(challenge)

    async def _ask(self, challenge: str | None) -> str:
        what = f"{self.source.id} ({self.source.base_url})"
        scheme, _, rest = (challenge or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            raise UpstreamError(f"{what} answered 401 Unauthorized with a challenge we do not answer "
                                f"({(challenge or 'none')[:200]!r}; only Bearer token auth is supported)",
                                challenge, 401)
        params = challenge_params(rest)
        realm = params.pop("realm", None)
        if not realm:
            raise UpstreamError(f"{what} asked for a Bearer token without a realm: {challenge[:200]!r}")
        params.setdefault("scope", f"repository:{self.repository}:pull")
        query = {k: params[k] for k in ("service", "scope") if k in params}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        if self.secret is not None and not self.policy.trusts(realm):
            raise PolicyRefused("token_realm", f"{what} sends us to the token realm {_shown(realm)}, which is "
                                "neither the source's own origin nor an allowed URL prefix; the credentials of "
                                f"sources.{self.source.id} go only there: add its URL prefix to "
                                "models.download.allowed_sources to allow it")
        if self.username is not None:
            pair = f"{self.username}:{self.secret}".encode()
            credentials = f"Basic {base64.b64encode(pair).decode()}"
            who = f"as {self.username}"
        elif self.secret is not None:
            credentials, who = f"Bearer {self.secret}", "with the configured token"
        else:
            credentials, who = None, "anonymously"
        transfer = Transfer(self.session, self.policy, url, None, {"Accept": "application/json"},
                            settings=self.settings, credentials=credentials)
        try:
            body = await _small_body(transfer)
        except UpstreamError as exc:
            if exc.upstream_status in (401, 403):
                raise UpstreamError(f"{what}: its token realm refused to give a token {who} (sources."
                                    f"{self.source.id}): {exc.detail}", upstream_status=exc.upstream_status) from None
            raise UpstreamError(f"{what}: its token realm: {exc.detail}", upstream_status=exc.upstream_status) \
                from None
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"{what}: its token realm {_shown(realm)} answered no token "
                                "(expected a JSON object with \"token\" or \"access_token\")")
        logger.info("download from %s: a token for %s from the realm %s, asked %s", self.source.id,
                    query.get("scope", "?"), _shown(realm), who)
        return token


async def _small_body(transfer: Transfer) -> bytes:
    """The realm's answer, at most MAX_TOKEN_ANSWER bytes, whole within ``downloads.read_timeout``: the read
    timeout alone bounds each read, and a realm sending a byte at a time would hold the download forever."""
    response = await transfer.open()
    bound = transfer.settings.read_timeout
    try:
        raw = bytearray()
        async with asyncio.timeout(bound) as whole:
            async for chunk in response.content.iter_any():
                raw += chunk
                if len(raw) > MAX_TOKEN_ANSWER:
                    raise UpstreamError(f"{_shown(transfer.url)} answered more than {MAX_TOKEN_ANSWER} bytes")
        return bytes(raw)
    except TimeoutError:
        if not whole.expired():
            raise UpstreamError(f"{_shown(transfer.url)}: no byte for {bound:g}s") from None
        raise UpstreamError(f"{_shown(transfer.url)} did not finish its answer within {bound:g}s "
                            f"(downloads.read_timeout; {len(raw)} bytes came)") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{_shown(transfer.url)}: {exc or type(exc).__name__}") from None
    finally:
        response.release()
