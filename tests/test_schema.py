"""The schema: schema.sql and the migrations agree; versions are enforced; the CLI reports them."""

import psycopg
import pytest

from conftest import run_cli
from modelcache.db import Database
from modelcache.db.migrate import migrate, migrations, status
from modelcache.errors import SchemaTooNew

pytestmark = pytest.mark.registry

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


async def test_schema_sql_and_migrations_build_the_same_database(make_database):
    from_schema, from_migrations = make_database(empty=True), make_database(empty=True)
    for dsn, fresh in ((from_schema, True), (from_migrations, False)):
        db = Database(dsn)
        await db.open()
        try:
            await migrate(db, fresh_from_schema=fresh)
            assert (await status(db)).up_to_date
        finally:
            await db.close()
    a, b = describe(from_schema), describe(from_migrations)
    for part in INTROSPECT:
        assert a[part] == b[part], f"schema.sql and migrations differ in {part}"
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
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')", (latest + 1,))
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
    done = run_cli("db", "status", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert "database: empty" in done.stdout and "pending: 1" in done.stdout
    done = run_cli("db", "migrate", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert "applied 0001_initial" in done.stdout
    done = run_cli("db", "migrate", "--dsn", dsn)
    assert "schema is up to date" in done.stdout
    done = run_cli("db", "status", "--dsn", dsn)
    assert "database: 1; code: 1; pending: 0" in done.stdout
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT subject_type, action, outcome FROM model_audit_log ORDER BY created_at").fetchall()
    assert rows == [("local", "schema.migrate", "applied"), ("local", "schema.migrate", "unchanged")]


def test_unreachable_database_is_one_clear_line(tmp_path):
    done = run_cli("db", "status", "--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("modelcache: error:") and "127.0.0.1:1" in last
