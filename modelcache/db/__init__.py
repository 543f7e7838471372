"""The database layer: the pool, migrations, the embedded server and the registry's queries."""

from .pool import Database, describe_dsn

__all__ = ["Database", "describe_dsn"]
