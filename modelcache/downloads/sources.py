"""The configured upstream sources, and where a reference of one points.

A source is configured in the static config (``[sources.<id>]``), never in the
database; its token is read from the environment variable or file the config
names, when a transfer starts, and is never logged or stored.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass

from ..config import Settings, SourceSettings
from ..errors import ConfigError, InvalidInput, NotFound

# a reference of the http kind: a relative path below the source's base URL
_SEGMENT = re.compile(r"[A-Za-z0-9._~+=,@-]+")
MAX_REFERENCE = 1000


@dataclass(frozen=True)
class Source:
    settings: SourceSettings

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def base_url(self) -> str:
        return self.settings.url

    def url_for(self, reference: str) -> str:
        """The URL of ``reference`` (a relative path such as ``org/model-q4.gguf``) below the base URL."""
        return self.base_url + parse_reference(reference)

    def token(self) -> str | None:
        """The bearer token the config names, read now; an error names the key, never the value."""
        s = self.settings
        if s.token_env:
            value = os.environ.get(s.token_env)
            if not value:
                raise ConfigError(f"sources.{s.id}.token_env names {s.token_env}, which is not set in the "
                                  "environment of this process")
            return value.strip()
        if s.token_file:
            try:
                value = s.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"sources.{s.id}.token_file = {str(s.token_file)!r}: cannot read it "
                                  f"({exc.strerror})") from None
            if not value:
                raise ConfigError(f"sources.{s.id}.token_file = {str(s.token_file)!r} is empty")
            return value
        return None


def parse_reference(reference: str) -> str:
    """A reference of the http kind: path segments of safe characters; never absolute, never ``..``."""
    ok = isinstance(reference, str) and 1 <= len(reference) <= MAX_REFERENCE and all(
        _SEGMENT.fullmatch(s) and s not in (".", "..") for s in reference.split("/"))
    if not ok:
        shown = reference[:100] if isinstance(reference, str) else reference
        raise InvalidInput(f"invalid reference {shown!r}: expected a path relative to the source's URL, such as "
                           "org/model-q4.gguf (segments of A-Z a-z 0-9 . _ ~ + = , @ -, no '..')")
    return "/".join(urllib.parse.quote(s, safe="~+=,@-._") for s in reference.split("/"))


def find_source(settings: Settings, source_id: str) -> Source:
    source = settings.sources.get(source_id)
    if source is None:
        known = ", ".join(sorted(settings.sources)) or "none are configured"
        raise NotFound(f"no source {source_id!r} is configured (known: {known}); sources are [sources.<id>] "
                       "tables in the config file")
    return Source(source)
