"""The schema: schema.sql and the migrations agree; versions are enforced; the CLI reports them."""

import hashlib
from pathlib import Path

import psycopg
import pytest

import modelcache
from conftest import run_cli
from modelcache.db import Database
from modelcache.db.migrate import migrate, migrations, status
from modelcache.errors import MigrationChanged, SchemaTooNew

pytestmark = pytest.mark.registry

MIGRATIONS = Path(modelcache.__file__).parent / "migrations"

# What the first release's runner created before applying 0001 (db/migrate.py at release).
RELEASED_BOOKKEEPING = """
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

INTROSPECT = {
    "columns": """SELECT table_name, column_name, data_type, is_nullable, column_default
                    FROM information_schema.columns WHERE table_schema = 'public'""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal",
    "functions": """SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
}


def describe(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return {name: sorted(conn.execute(sql).fetchall(), key=repr) for name, sql in INTROSPECT.items()}


def assert_same_schema(expected_dsn: str, actual_dsn: str, road: str) -> dict:
    a, b = describe(expected_dsn), describe(actual_dsn)
    for part in INTROSPECT:
        assert a[part] == b[part], f"schema.sql and {road} differ in {part}"
    return a


def shipped_checksums() -> list[tuple[int, str, str]]:
    """(version, name, sha256 of the bytes) of every migration file in the package."""
    found = []
    for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        version, name = path.stem.split("_", 1)
        found.append((int(version), name, hashlib.sha256(path.read_bytes()).hexdigest()))
    return found


def recorded_checksums(dsn: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version").fetchall()


def blob_notifications(dsn: str, statement: str, params: tuple) -> list[str]:
    """Payloads on modelcache_blobs caused by one statement (a marker notification ends the wait)."""
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as writer:
        listener.execute("LISTEN modelcache_blobs")
        writer.execute(statement, params)
        writer.execute("SELECT pg_notify('modelcache_blobs', 'end of test statement')")
        seen = []
        for note in listener.notifies(timeout=10):
            if note.payload == "end of test statement":
                return seen
            seen.append(note.payload)
    raise AssertionError(f"the marker notification never arrived; saw {seen}")


async def migrate_dsn(dsn: str, **kw) -> list:
    db = Database(dsn)
    await db.open()
    try:
        applied = await migrate(db, **kw)
        assert (await status(db)).up_to_date
        return applied
    finally:
        await db.close()


async def test_schema_sql_and_migrations_build_the_same_database(make_database):
    from_schema, from_migrations = make_database(empty=True), make_database(empty=True)
    for dsn, fresh in ((from_schema, True), (from_migrations, False)):
        await migrate_dsn(dsn, fresh_from_schema=fresh)
    a = assert_same_schema(from_schema, from_migrations, "migrations")
    assert recorded_checksums(from_schema) == recorded_checksums(from_migrations) == shipped_checksums()
    tables = {row[0] for row in a["columns"]}
    assert {"models", "model_versions", "model_artifacts", "node_model_availability", "blobs", "artifact_files",
            "preference_entries", "preference_audit_log", "model_audit_log", "model_downloads", "api_tokens",
            "node_load_requests", "schema_migrations"} <= tables


def test_spec_tables_keep_the_spec_columns_and_constraints(dsn):
    parts = describe(dsn)
    columns = {(t, c) for t, c, *_ in parts["columns"]}
    spec = {
        "models": ["id", "name", "vendor", "description", "created_at", "updated_at", "updated_by"],
        "model_versions": ["id", "model_id", "version", "capabilities", "default_parameters", "created_at",
                           "updated_at"],
        "model_artifacts": ["id", "model_version_id", "artifact_type", "sha256", "size_bytes", "cache_path",
                            "source_uri", "created_at"],
        "node_model_availability": ["id", "node_id", "model_version_id", "status", "last_checked_at", "details"],
    }
    for table, cols in spec.items():
        for col in cols:
            assert (table, col) in columns, f"{table}.{col} missing"
    constraints = {(t, d) for t, _, d in parts["constraints"]}
    assert ("models", "UNIQUE NULLS NOT DISTINCT (name, vendor)") in constraints
    assert ("model_versions", "UNIQUE (model_id, version)") in constraints
    assert ("model_artifacts", "UNIQUE (sha256)") in constraints
    assert ("node_model_availability", "UNIQUE (node_id, model_version_id)") in constraints
    indexes = {d.split(" USING ")[1] for _, _, d in parts["indexes"]}
    for idx in ("btree (name)", "btree (model_id)", "btree (model_version_id)", "btree (node_id)"):
        assert idx in indexes


async def test_a_database_newer_than_the_code_is_refused(dsn):
    latest = migrations()[-1].version
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, 'from_the_future', %s)",
                     (latest + 1, "0" * 64))
    db = Database(dsn)
    await db.open()
    try:
        with pytest.raises(SchemaTooNew, match=f"version {latest + 1}"):
            await migrate(db)
    finally:
        await db.close()
    done = run_cli("serve", "--dsn", dsn, "--port", "0")
    assert done.returncode == 1
    assert f"database schema is at version {latest + 1}" in done.stderr.strip().splitlines()[-1]


def test_db_status_and_migrate_cli(make_database):
    dsn = make_database(empty=True)
    latest = migrations()[-1].version
    done = run_cli("db", "status", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert "database: empty" in done.stdout and f"pending: {latest}" in done.stdout
    done = run_cli("db", "migrate", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert "applied 0001_initial" in done.stdout and "applied 0002_blob_notify_and_checksums" in done.stdout
    done = run_cli("db", "migrate", "--dsn", dsn)
    assert "schema is up to date" in done.stdout
    done = run_cli("db", "status", "--dsn", dsn)
    assert f"database: {latest}; code: {latest}; pending: 0" in done.stdout
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT subject_type, action, outcome FROM model_audit_log ORDER BY created_at").fetchall()
    assert rows == [("local", "schema.migrate", "applied"), ("local", "schema.migrate", "unchanged")]


def test_unreachable_database_is_one_clear_line(tmp_path):
    done = run_cli("db", "status", "--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("modelcache: error:") and "127.0.0.1:1" in last


async def test_a_database_from_the_first_release_upgrades_to_schema_sql(make_database):
    # A database at version 1, migrated by the first build: its runner's bookkeeping table, 0001 as it
    # ran then (the trigger as it was before 0001 was edited in place; 0002 changes it and pins 0001's
    # checksum, checked below), and rows that the changed trigger concerns.
    old = make_database(empty=True)
    digest = "sha256:" + "ab" * 32
    with psycopg.connect(old) as conn:
        conn.execute(RELEASED_BOOKKEEPING)
        conn.execute((MIGRATIONS / "0001_initial.sql").read_text())
        # the first build's 0001 (before it was edited in place) had the trigger fire on every update
        conn.execute("DROP TRIGGER blobs_notify ON blobs")
        conn.execute("CREATE TRIGGER blobs_notify AFTER INSERT OR UPDATE OR DELETE ON blobs "
                     "FOR EACH ROW EXECUTE FUNCTION notify_blob_change()")
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'initial')")
        conn.execute("INSERT INTO blobs (digest, size_bytes, xxh3_128) VALUES (%s, 2048, %s)", (digest, "cd" * 16))
        model = conn.execute("INSERT INTO models (name, updated_by) VALUES ('tiny', 'test') RETURNING id").fetchone()
        version = conn.execute("INSERT INTO model_versions (model_id, version) VALUES (%s, '1') RETURNING id",
                               model).fetchone()
        artifact = conn.execute(
            """INSERT INTO model_artifacts (model_version_id, artifact_type, sha256, size_bytes, cache_path,
                                            state, updated_by)
               VALUES (%s, 'gguf', %s, 2048, 'tiny.gguf', 'promoted', 'test') RETURNING id""",
            (version[0], digest.removeprefix("sha256:"))).fetchone()
        conn.execute("""INSERT INTO artifact_files (artifact_id, path, blob_digest, size_bytes, media_type)
                        VALUES (%s, 'tiny.gguf', %s, 2048, 'application/octet-stream')""", (artifact[0], digest))
    touch = ("UPDATE blobs SET last_accessed_at = now() WHERE digest = %s", (digest,))
    assert blob_notifications(old, *touch) == [digest], "the released trigger notified on every access time"

    applied = await migrate_dsn(old)

    assert [m.version for m in applied] == [m.version for m in migrations() if m.version > 1]
    assert_same_schema(make_database(), old, "an upgraded first-release database")
    assert recorded_checksums(old) == shipped_checksums()
    # 0002's trigger on the rows written under 0001: access times are quiet, state changes are heard.
    assert blob_notifications(old, *touch) == []
    assert blob_notifications(old, "UPDATE blobs SET state = 'quarantined' WHERE digest = %s", (digest,)) == [digest]
    assert blob_notifications(old, "UPDATE model_artifacts SET state = 'evicted' WHERE id = %s",
                              (artifact[0],)) == [digest]


async def test_an_edited_applied_migration_refuses_to_start(dsn):
    shipped = hashlib.sha256((MIGRATIONS / "0001_initial.sql").read_bytes()).hexdigest()
    recorded = hashlib.sha256(b"0001 as some earlier build shipped it").hexdigest()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = %s WHERE version = 1", (recorded,))
    db = Database(dsn)
    await db.open()
    try:
        with pytest.raises(MigrationChanged, match="0001_initial") as caught:
            await migrate(db)
        assert (caught.value.recorded, caught.value.shipped) == (recorded, shipped)
        with pytest.raises(MigrationChanged):
            await status(db)
    finally:
        await db.close()
    for verb in (("db", "status"), ("db", "migrate"), ("serve", "--port", "0")):
        done = run_cli(*verb, "--dsn", dsn)
        assert done.returncode == 1, (verb, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        if verb[0] == "db":  # serve may log its start-up first; the refusal is still its last line
            assert len(lines) == 1, (verb, done.stderr)
        assert lines[-1].startswith("modelcache: error: migration 0001_initial")
        assert recorded in lines[-1] and shipped in lines[-1]


# What the landed builds shipped (3713eb2 and 7412829; 0001 is the same in both): databases they migrated
# recorded these checksums and refuse to start (db/migrate.py) if the file changes. A change to the
# schema is a new numbered migration, never an edit.
RELEASED = {
    1: "ece3a3bc2e820b3d4fcef17370a109f5cd4eb2a3ef3aaa4e3120b3c1c08f5e65",
    2: "557158060c790e479905296c68ba493d73a7a96073417e964c1d7c9b66fbffde",
    3: "831472cfa897b825af4dbfb0f973d2710f7b3e41afd5cbe5cbb97413b36c483c",
    4: "da3afeb761de42f6e897fc18000b1b9157f4d72a6be0a8e410df26c1285c0d47",
    5: "ddc9daf54539ea1036ecc0e916bb8a683966cbd422d0db97afd3ea03f70b11fc",
}


def test_released_migrations_are_never_edited():
    shipped = {version: checksum for version, _, checksum in shipped_checksums()}
    assert {v: shipped.get(v) for v in RELEASED} == RELEASED


def test_a_fresh_install_records_the_checksum_of_every_migration(dsn):
    # dsn is built from schema.sql (the session template); every shipped migration is stamped.
    recorded = recorded_checksums(dsn)
    assert [v for v, _, _ in recorded] == [m.version for m in migrations()] and len(recorded) >= 2
    assert recorded == shipped_checksums()
