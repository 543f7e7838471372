"""Static configuration: where things are. Policy lives in the database (preferences.py).

Values come from, in rising precedence: the defaults below (the only place
defaults live), a TOML file (``--config`` or ``MODELCACHE_CONFIG``), the
environment (``MODELCACHE_<SECTION>_<KEY>``) and command-line flags. They are
parsed and validated once, in :func:`load`; a bad value raises
:class:`~modelcache.errors.ConfigError` naming the key and the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 12085
    # The URL nodes use to reach this server; empty means http://<host>:<port>.
    public_url: str = ""
    # Networks whose clients may pull promoted blobs without a token.
    trusted_networks: tuple[IPNetwork, ...] = ()
    # Seconds a connection may stay open without a whole request's headers: idle between
    # requests (keep-alive), or sending its request line and headers too slowly (or not at all).
    keepalive_timeout: float = 30.0


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path = Path("~/.local/share/modelcache")
    # Empty means <data_dir>/import.
    import_dir: Path | None = None
    # Seconds between background re-hashes of every blob; 0 turns the scrub off.
    scrub_interval: float = 0.0


@dataclass(frozen=True)
class DatabaseSettings:
    # Empty means an embedded PostgreSQL under <data_dir>/pg.
    dsn: str = ""
    pool_min_size: int = 1
    pool_max_size: int = 8
    # Seconds to open a new connection (psycopg's connect_timeout, at least 2).
    connect_timeout: float = 5.0
    # Seconds a caller waits for a free, working connection from the pool.
    acquire_timeout: float = 5.0
    # Seconds a statement may run (PostgreSQL's statement_timeout); a server that does not
    # answer at all (frozen, unreachable) is given up one second later and the connection dropped.
    # Migrations and LISTEN use their own connections without this bound.
    statement_timeout: float = 5.0


@dataclass(frozen=True)
class SyncdSettings:
    settle_seconds: float = 3.0
    workers: int = 2
    force_polling: bool = False
    # An import that takes longer than this logs a progress line this often.
    progress_seconds: float = 5.0


@dataclass(frozen=True)
class DownloadSettings:
    # Transfers one process runs at once (run and fetchd).
    workers: int = 2
    # Seconds between looks for new jobs when no notification arrived.
    poll_seconds: float = 2.0
    # Redirects followed per request; each hop is checked against the policy again.
    max_redirects: int = 5
    # A PEM file of CA certificates for https sources; empty: the system's.
    ca_bundle: Path | None = None
    # Seconds to connect, and seconds without a byte before a transfer counts as dropped (and resumes).
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    # Files at least this big are fetched as parallel_parts ranged requests at once, where the
    # upstream serves ranges; smaller ones (or parallel_parts = 1) as one stream.
    part_threshold_bytes: int = 256 << 20
    parallel_parts: int = 4
    # Bytes per second all upstream transfers of one process share (a token bucket); 0: unlimited.
    max_bytes_per_second: int = 0
    # An upstream answering 429 or 5xx, or not reachable, is asked again this many times per request,
    # after Retry-After when it says, else after retry_seconds doubled each time, at most retry_max_seconds.
    retries: int = 5
    retry_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    # A /v2 or /hf miss that started a pull-through download waits this long for it to complete and then
    # answers from the cache; past it, the client is told to retry (models.download.pull_through).
    pull_through_wait_seconds: float = 30.0


@dataclass(frozen=True)
class NodeSettings:
    # Seconds without a heartbeat (or registration) after which a node is shown stale and never chosen.
    heartbeat_timeout: float = 90.0
    # Seconds a load may go without a report from its node before it counts as failed.
    loading_timeout: float = 600.0
    # Seconds selection and placements keep away from a node that failed to load a version.
    failure_backoff: float = 600.0
    # The pull settings handed to a node when it registers.
    pull_parallel_parts: int = 4
    pull_part_bytes: int = 64 << 20


SOURCE_KINDS = ("http", "huggingface", "ollama", "modelcache")
_SOURCE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class SourceSettings:
    """An upstream a download may come from (``[sources.<id>]``). Credentials are named, never held here."""

    id: str
    kind: str
    url: str
    # The environment variable, or the file, holding a bearer token; read when a transfer starts.
    token_env: str | None = None
    token_file: Path | None = None
    # Downloads from this source one process runs at once (the others wait, queued).
    max_concurrent: int = 2
    # ollama: the account name sent with the token (as its password) to the registry's token realm.
    username: str | None = None


@dataclass(frozen=True)
class LogSettings:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    syncd: SyncdSettings = field(default_factory=SyncdSettings)
    downloads: DownloadSettings = field(default_factory=DownloadSettings)
    nodes: NodeSettings = field(default_factory=NodeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sources: dict[str, SourceSettings] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir

    @property
    def import_dir(self) -> Path:
        return self.storage.import_dir or self.storage.data_dir / "import"

    @property
    def public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"


# -- parsers: each takes the raw value (TOML value or env/flag string) ---------


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        expected = ValueError(f"expected an integer from {lo} to {hi}")
        try:
            value = int(raw, 10) if isinstance(raw, str) else raw
        except ValueError:
            raise expected from None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise expected
        return value

    return parse


def _float(lo: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        expected = ValueError(f"expected a number of at least {lo}")
        if isinstance(raw, bool):
            raise expected
        try:
            value = float(raw)
        except (ValueError, TypeError):
            raise expected from None
        if not lo <= value < float("inf"):
            raise expected
        return value

    return parse


def _seconds(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        expected = ValueError(f"expected seconds from {lo:g} to {hi:g}")
        if isinstance(raw, bool):
            raise expected
        try:
            value = float(raw)
        except (ValueError, TypeError):
            raise expected from None
        if not lo <= value <= hi:
            raise expected
        return value

    return parse


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    return raw


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = _str(raw).lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _path(raw: Any) -> Path:
    value = _str(raw)
    if not value:
        raise ValueError("expected a path")
    return Path(value).expanduser()


def _optional_path(raw: Any) -> Path | None:
    return _path(raw) if raw not in ("", None) else None


def _url(raw: Any) -> str:
    value = _str(raw)
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _networks(raw: Any) -> tuple[IPNetwork, ...]:
    items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of networks such as 10.0.0.0/8")
    try:
        return tuple(ipaddress.ip_network(_str(item), strict=False) for item in items)
    except ValueError as exc:
        raise ValueError(f"expected networks such as 10.0.0.0/8 ({exc})") from None


_PARSERS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "server": {
        "host": _str,
        "port": _int(0, 65535),
        "public_url": _url,
        "trusted_networks": _networks,
        "keepalive_timeout": _seconds(0.1, 3600),
    },
    "storage": {"data_dir": _path, "import_dir": _optional_path, "scrub_interval": _float(0)},
    "database": {"dsn": _str, "pool_min_size": _int(1, 100), "pool_max_size": _int(1, 100),
                 "connect_timeout": _seconds(2, 3600), "acquire_timeout": _seconds(0.1, 3600),
                 "statement_timeout": _seconds(0.1, 86400)},
    "syncd": {"settle_seconds": _float(0), "workers": _int(1, 64), "force_polling": _bool,
              "progress_seconds": _float(0)},
    "downloads": {"workers": _int(1, 64), "poll_seconds": _seconds(0.1, 3600), "max_redirects": _int(0, 20),
                  "ca_bundle": _optional_path, "connect_timeout": _seconds(1, 3600),
                  "read_timeout": _seconds(1, 86400), "part_threshold_bytes": _int(1 << 20, 1 << 50),
                  "parallel_parts": _int(1, 16), "max_bytes_per_second": _int(0, 1 << 40),
                  "retries": _int(0, 100), "retry_seconds": _seconds(0.01, 3600),
                  "retry_max_seconds": _seconds(0.01, 86400), "pull_through_wait_seconds": _seconds(0, 3600)},
    "nodes": {"heartbeat_timeout": _seconds(0.1, 86400), "loading_timeout": _seconds(0.1, 86400),
              "failure_backoff": _seconds(0, 86400), "pull_parallel_parts": _int(1, 64),
              "pull_part_bytes": _int(1 << 20, 1 << 34)},
    "log": {"format": _choice("text", "json"), "level": _choice("debug", "info", "warning", "error")},
}

_SOURCE_KEYS = ("kind", "url", "token_env", "token_file", "max_concurrent", "username")


def _source(source_id: str, values: Any, origin: str) -> SourceSettings:
    """``[sources.<id>]``: a kind this version supports, a base URL, at most one way to a token."""
    def bad(key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"sources.{source_id}.{key} = {value!r} (from {origin}): {why}")

    if not _SOURCE_ID.fullmatch(source_id):
        raise ConfigError(f"[sources.{source_id}] (from {origin}): a source id is 1-63 of a-z 0-9 _ -, "
                          "starting with a letter or digit")
    if not isinstance(values, dict):
        raise ConfigError(f"sources.{source_id} (from {origin}): must be a table")
    for key in values:
        if key not in _SOURCE_KEYS:
            raise ConfigError(f"{origin}: unknown key sources.{source_id}.{key}; known: {', '.join(_SOURCE_KEYS)}")
    kind = values.get("kind")
    if kind is None:
        raise ConfigError(f"sources.{source_id}.kind (from {origin}) is missing: expected one of "
                          f"{', '.join(SOURCE_KINDS)}")
    if kind not in SOURCE_KINDS:
        raise bad("kind", kind, f"expected one of {', '.join(SOURCE_KINDS)}")
    url = values.get("url")
    try:
        url = _url(url)
    except ValueError as exc:
        raise bad("url", url, str(exc)) from None
    if not url or "?" in url or "#" in url or "@" in url.split("/", 3)[2]:
        raise bad("url", url, "expected a base URL such as https://host/models/ (no query, fragment or user)")
    token_env, token_file = values.get("token_env"), values.get("token_file")
    if token_env is not None and (not isinstance(token_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                                                        token_env)):
        raise bad("token_env", token_env, "expected the name of an environment variable")
    if token_file is not None:
        try:
            token_file = _path(token_file)
        except ValueError as exc:
            raise bad("token_file", token_file, str(exc)) from None
    if token_env and token_file:
        raise ConfigError(f"sources.{source_id} (from {origin}): give token_env or token_file, not both")
    extra = {}
    if "max_concurrent" in values:
        try:
            extra["max_concurrent"] = _int(1, 64)(values["max_concurrent"])
        except ValueError as exc:
            raise bad("max_concurrent", values["max_concurrent"], str(exc)) from None
    if "username" in values:
        username = values["username"]
        if not isinstance(username, str) or not re.fullmatch(r"[^\s:]{1,255}", username):
            raise bad("username", username, "expected an account name (no spaces or ':')")
        if kind != "ollama":
            raise bad("username", username, "only an ollama source takes one (for its registry's token realm)")
        if not (token_env or token_file):
            raise bad("username", username, "needs token_env or token_file naming its password or access token")
        extra["username"] = username
    return SourceSettings(source_id, kind, url if url.endswith("/") else url + "/", token_env, token_file, **extra)

def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings from a TOML file, the environment and flag overrides.

    ``overrides`` maps ``"section.key"`` to a value; ``None`` values are
    ignored, so click options can default to ``None``.
    """
    env = os.environ if env is None else env
    raw: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in _PARSERS}
    sources: dict[str, SourceSettings] = {}

    config_file = config_file or (Path(env["MODELCACHE_CONFIG"]) if env.get("MODELCACHE_CONFIG") else None)
    if config_file is not None:
        for section, values in _read_toml(config_file).items():
            if section == "sources":
                sources = {sid: _source(sid, v, str(config_file)) for sid, v in values.items()}
                continue
            for key, value in values.items():
                raw[section][key] = (value, f"{config_file}")

    for section, keys in _PARSERS.items():
        for key in keys:
            name = f"MODELCACHE_{section.upper()}_{key.upper()}"
            if name in env:
                raw[section][key] = (env[name], f"environment {name}")

    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            raw[section][key] = (value, "command line")

    sections: dict[str, Any] = {}
    for section, values in raw.items():
        parsed = {}
        for key, (value, origin) in values.items():
            try:
                parsed[key] = _PARSERS[section][key](value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{section}.{key} = {value!r} (from {origin}): {exc}") from None
        sections[section] = _section_class(section)(**parsed)
    settings = Settings(**sections, sources=sources)
    if settings.database.pool_min_size > settings.database.pool_max_size:
        raise ConfigError(
            f"database.pool_min_size = {settings.database.pool_min_size} is above "
            f"database.pool_max_size = {settings.database.pool_max_size}"
        )
    return settings


def _section_class(section: str) -> type:
    return {
        "server": ServerSettings,
        "storage": StorageSettings,
        "database": DatabaseSettings,
        "syncd": SyncdSettings,
        "downloads": DownloadSettings,
        "nodes": NodeSettings,
        "log": LogSettings,
    }[section]


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in _PARSERS and section != "sources":
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(_PARSERS)}, sources")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section} must be a table")
        if section == "sources":
            continue  # [sources.<id>] tables are checked by _source
        for key in values:
            if key not in _PARSERS[section]:
                raise ConfigError(
                    f"{path}: unknown key {section}.{key}; known: {', '.join(_PARSERS[section])}"
                )
    return data
