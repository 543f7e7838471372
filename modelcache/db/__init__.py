"""The database layer: the pool, migrations, the embedded server, and every query, grouped by what it is about.

    pool.py         the connection pool (timeouts, LISTEN), driver errors turned into ours
    migrate.py      schema_migrations: schema.sql for a fresh database, numbered migrations to upgrade,
                    each applied one checked against the sha256 recorded when it was applied
    embedded.py     the embedded PostgreSQL under <data_dir>/pg when no dsn is set
    rows.py         one row, all rows, keyset paging with opaque cursors
    models.py       models and versions (capabilities, default parameters)
    artifacts.py    artifacts and their files, states, eviction candidates
    blobs.py        the store's index, what the in-memory catalog loads, and the change log it follows
    audit.py        the audit log, written and read
    tokens.py       API tokens (secrets only as sha256)
    preferences.py  policy preferences and their audit trail
    downloads.py    download jobs: requests, claims (FOR UPDATE SKIP LOCKED), progress, single-flight
    nodes.py        nodes, their availability, load requests and placements
    oci.py, hf.py   what the /v2 and /hf views load

Nothing outside this package imports psycopg; parameters are always bound, never formatted into SQL.
"""

from .pool import Database, describe_dsn

__all__ = ["Database", "describe_dsn"]
