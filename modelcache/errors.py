"""The one exception family of modelcache.

Each error says what was expected, what was found and which file, digest or
key is at fault. The HTTP layer maps them to problem+json answers in one
middleware (``server/errors.py``); the CLI maps them to exit codes in one
place (``cli/__init__.py``).
"""

from __future__ import annotations


class ModelcacheError(Exception):
    """Base class: an operation failed for a reason worth telling the user."""

    status = 500
    title = "Internal error"
    # RFC 9457 extension members a problem+json answer carries besides type, title, status, detail
    extensions: dict | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(ModelcacheError):
    """A value given by the user or a client does not parse."""

    status = 400
    title = "Invalid input"


class ConfigError(InvalidInput):
    """A configuration value is invalid; names the key and the value."""

    title = "Invalid configuration"


class NotFound(ModelcacheError):
    status = 404
    title = "Not found"


class Conflict(ModelcacheError):
    status = 409
    title = "Conflict"


class Unauthorized(ModelcacheError):
    status = 401
    title = "Unauthorized"


class Forbidden(ModelcacheError):
    status = 403
    title = "Forbidden"


class ChecksumError(ModelcacheError):
    """Bytes did not hash to what was expected."""

    status = 422
    title = "Checksum mismatch"

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SourceChanged(ModelcacheError):
    """A file changed while it was being read; it is tried again later."""

    status = 409
    title = "Source changed"


class ImportRejected(ModelcacheError):
    """The content cannot be imported as asked (bad header, duplicate under another name)."""

    status = 422
    title = "Import rejected"


class StorageFull(ModelcacheError):
    """A filesystem has no room left (ENOSPC, or EDQUOT for a quota): nothing partial is kept, except a
    node pull's completed parts, which the next pull of that blob resumes."""

    status = 507
    title = "Insufficient storage"


class DatabaseUnavailable(ModelcacheError):
    status = 503
    title = "Database unavailable"


class SchemaTooNew(ModelcacheError):
    """The database was migrated by a newer modelcache than this one."""

    title = "Database schema is newer than this modelcache"


class MigrationChanged(ModelcacheError):
    """An applied migration's recorded checksum differs from the file this modelcache ships.

    Applied migrations are never edited: a database that already ran the old
    text never sees the edit. ``shipped`` is None when the file is gone.
    """

    title = "An applied migration differs from the shipped file"

    def __init__(self, migration: str, recorded: str, shipped: str | None) -> None:
        found = f"shipped file has sha256 {shipped}" if shipped else "no such file is shipped"
        super().__init__(
            f"migration {migration} was applied with sha256 {recorded}, but {found}: applied migrations are "
            "never edited; restore the file and make the change in a new numbered migration"
        )
        self.migration = migration
        self.recorded = recorded
        self.shipped = shipped
