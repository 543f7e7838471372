"""Signed blob URLs: a token holder's pull, handed on to a client that sends no credentials.

Ollama asks for a blob once with its credentials, reads the ``Location``
header of the answer, and fetches the blob's parts from that URL *without*
an Authorization header (protocols.md §2.3). So the ``Location`` a token holder
gets is the blob's URL plus three query parameters::

    ?expires=<unix seconds>&issued_to=<token name>&signature=<64 hex>

``signature`` is HMAC-SHA256 under the server's key over the digest, the
expiry and the token name. A request carrying a valid signature is served as
that token would be (its role decides whether staged blobs are readable), and
only while the token is live: revoking the token stops its URLs at once, so
the lifetime can be long enough for the slowest multi-gigabyte pull, whose
parts all reuse the one URL and which Ollama cannot refresh (it writes
whatever answer a part gets into the file).

The key is 32 random bytes in ``<data_dir>/url-signing.key`` (mode 0600),
made once by whichever process needs it first, so every server on the data
dir accepts the URLs the others sign.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Mapping

from ...digest import Digest
from ...errors import ConfigError, Unauthorized

logger = logging.getLogger(__name__)

KEY_FILE = "url-signing.key"
KEY_BYTES = 32
LIFETIME_SECONDS = 24 * 3600
PARAMS = ("expires", "issued_to", "signature")
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")  # hex only: compare_digest takes ASCII strings alone


class UrlSigner:
    """Signs and checks blob URLs with the key in ``<data_dir>/url-signing.key``; :meth:`load` it first."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / KEY_FILE
        self._key: bytes | None = None

    def load(self) -> None:
        """Read the key, making it on first use (blocking; call through a thread)."""
        try:
            key = self.path.read_bytes()
        except FileNotFoundError:
            key = _create_key(self.path)
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{self.path}: a URL-signing key must be {KEY_BYTES} bytes, found {len(key)}; "
                              "remove the file to make a new one (URLs signed with the old key stop working)")
        self._key = key

    def sign(self, digest: Digest, issued_to: str, now: float | None = None) -> dict[str, str]:
        """The query parameters that let a client without credentials read ``digest`` as ``issued_to``."""
        expires = int((time.time() if now is None else now) + LIFETIME_SECONDS)
        return {"expires": str(expires), "issued_to": issued_to,
                "signature": self._mac(digest, expires, issued_to)}

    def verify(self, digest: Digest, query: Mapping[str, str], now: float | None = None) -> str:
        """The token name a signed URL was issued to; Unauthorized if it is altered or expired."""
        expires, issued_to, signature = (query.get(p, "") for p in PARAMS)
        if not _EXPIRES.fullmatch(expires) or not issued_to or not _SIGNATURE.fullmatch(signature):
            raise Unauthorized("malformed signed URL: expected expires, issued_to and signature")
        if not hmac.compare_digest(signature, self._mac(digest, int(expires), issued_to)):
            raise Unauthorized(f"the signature of this URL for {digest} does not match")
        if int(expires) <= (time.time() if now is None else now):
            raise Unauthorized(f"this signed URL for {digest} expired at {expires}; ask for the blob again")
        return issued_to

    def _mac(self, digest: Digest, expires: int, issued_to: str) -> str:
        assert self._key is not None, "UrlSigner.load() was not called"
        message = f"modelcache-blob-url-v1\n{digest}\n{expires}\n{issued_to}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _create_key(path: Path) -> bytes:
    """Write a new key beside its final name and link it into place: two processes racing agree on one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
        logger.info("made a new URL-signing key in %s", path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        temp.unlink()
    return path.read_bytes()
