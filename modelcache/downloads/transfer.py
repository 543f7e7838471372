"""One HTTP transfer from an upstream: redirects followed by hand (each hop checked), resumed when dropped.

A dropped connection (a reset, a body cut short, ``downloads.read_timeout``
without a byte) is resumed with ``Range: bytes=<offset>-`` and ``If-Range:
<validator>``, the validator being the upstream's strong ETag or else its
Last-Modified: if the file changed meanwhile the upstream answers 200 with the
whole new file instead of 206, and the transfer starts over from byte 0
(:class:`UpstreamChanged`) rather than splicing two versions together.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import urllib.parse
from typing import AsyncIterator

import aiohttp

from ..config import DownloadSettings
from ..errors import ModelcacheError
from .policy import GuardedResolver, HopPolicy, InternalAddress, PolicyRefused

logger = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_RESUMES = 20  # drops resumed within one attempt before the transfer counts as failed
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class UpstreamError(ModelcacheError):
    """The upstream answered something we cannot use (404, 5xx, a bad range) or could not be reached."""

    status = 502
    title = "Upstream error"

    def __init__(self, detail: str, challenge: str | None = None) -> None:
        super().__init__(detail)
        self.challenge = challenge  # a 401's WWW-Authenticate, for a registry's token flow


class UpstreamChanged(ModelcacheError):
    """The file changed upstream between two requests of one download: start over from byte 0."""

    status = 409
    title = "Upstream changed"


def open_session(policy: HopPolicy, settings: DownloadSettings) -> aiohttp.ClientSession:
    """A client session for one transfer: the policy's resolver, the CA bundle, the proxy environment."""
    ssl_context: ssl.SSLContext | bool = True
    if settings.ca_bundle is not None:
        ssl_context = ssl.create_default_context(cafile=str(settings.ca_bundle))
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False, ssl=ssl_context)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout,
                                    sock_read=settings.read_timeout)
    # trust_env: HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured, as curl does
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True, auto_decompress=False)


class Transfer:
    """The bytes of ``url``, from ``offset`` on, through ``session``."""

    def __init__(self, session: aiohttp.ClientSession, policy: HopPolicy, url: str, token: str | None,
                 headers: dict[str, str] | None = None) -> None:
        self.session = session
        self.headers = headers or {}  # sent on every hop (an Accept, for a registry's manifest)
        self.policy = policy
        self.url = url
        self.token = token
        self.offset = 0  # where the next byte received goes in the file
        self.total: int | None = None
        self.validator: str | None = None
        self.resumes = 0

    async def open(self, offset: int = 0, validator: str | None = None) -> aiohttp.ClientResponse:
        """Request the file (from ``offset``, if the upstream still has the version ``validator`` names).

        Afterwards ``offset`` is where the answer's body starts: ``0`` when the upstream sent the
        whole file (it changed, or ignores ranges). ``total`` and ``validator`` are the upstream's.
        """
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if offset and validator:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        url = self.url
        for hop in range(self.policy.max_redirects + 2):
            self.policy.check(url, hop)
            sent = dict(headers)
            if self.token and self.policy.trusts(url):  # the token goes to the configured source only
                sent["Authorization"] = f"Bearer {self.token}"
            try:
                response = await self.session.get(url, headers=sent, allow_redirects=False)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, InternalAddress):
                    raise PolicyRefused("internal_address", str(exc.os_error).split(": ", 1)[1]) from None
                raise UpstreamError(f"cannot reach {_shown(url)}: {exc.os_error}") from None
            if response.status in REDIRECTS and "Location" in response.headers:
                location = response.headers["Location"]
                response.release()
                url = urllib.parse.urljoin(url, location)
                continue
            return self._accept(response, url, offset)
        raise AssertionError("unreachable: policy.check refuses the hop after the last")

    def _accept(self, response: aiohttp.ClientResponse, url: str, offset: int) -> aiohttp.ClientResponse:
        length = response.content_length
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                response.release()
                raise UpstreamError(f"{_shown(url)} answered a range we did not ask for "
                                    f"({response.headers.get('Content-Range')!r}, asked from byte {offset})")
            self.offset = offset
            self.total = int(match.group(3)) if match.group(3) != "*" else None
            return response
        if response.status == 416 and offset:
            match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:  # every byte was here already
                self.offset = self.total = offset
                return response
        if response.status != 200:
            status = f"{response.status} {response.reason}"
            challenge = response.headers.get("WWW-Authenticate") if response.status == 401 else None
            response.release()
            raise UpstreamError(f"{_shown(url)} answered {status}", challenge)
        self.offset = 0
        self.total = length
        etag = response.headers.get("ETag")
        # If-Range needs a strong validator: a weak ETag cannot say two versions are the same bytes
        self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        return response

    async def chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body from ``offset`` to the end; a dropped connection is resumed where it stopped."""
        while True:
            try:
                if response.status != 416:
                    async for chunk in response.content.iter_any():
                        self.offset += len(chunk)
                        yield chunk
                response.release()
                if self.total is not None and self.offset < self.total:
                    raise aiohttp.ClientPayloadError(f"the body ended at byte {self.offset} of {self.total}")
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                response.release()
                if self.validator is None:
                    raise UpstreamChanged(f"{_shown(self.url)} dropped at byte {self.offset} and sends no ETag or "
                                          "Last-Modified to resume against; starting over") from None
                self.resumes += 1
                if self.resumes > MAX_RESUMES:
                    raise UpstreamError(f"{_shown(self.url)} dropped {self.resumes} times; last at byte "
                                        f"{self.offset}: {exc or type(exc).__name__}") from None
                logger.info("download from %s dropped at byte %d (%s); resuming with Range and If-Range",
                            _shown(self.url), self.offset, exc or type(exc).__name__)
                at = self.offset
                response = await self._reopen(at)
                if self.offset != at:
                    response.release()
                    raise UpstreamChanged(f"{_shown(self.url)} changed upstream (If-Range {self.validator} no "
                                          f"longer matches) after {at} bytes; starting over") from None


    async def _reopen(self, at: int) -> aiohttp.ClientResponse:
        """Ask again from byte ``at``; an upstream that cannot be reached for a moment is tried again."""
        while True:
            await asyncio.sleep(min(0.2 * self.resumes, 5))
            try:
                return await self.open(at, self.validator)
            except UpstreamError as exc:
                self.resumes += 1
                if self.resumes > MAX_RESUMES:
                    raise
                logger.info("resuming %s from byte %d failed (%s); trying again", _shown(self.url), at,
                            exc.detail)


def _shown(url: str) -> str:
    """A URL for logs and errors: never its user info or query (which may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
