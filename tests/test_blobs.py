"""The blob server over real HTTP on loopback, against a real registry."""

import asyncio
import hashlib

import psycopg
import pytest

from modelcache.digest import Digest

pytestmark = pytest.mark.registry


@pytest.fixture
async def blob2048(make_file, make_artifact):
    path = make_file(content=b"GGUF" + bytes(range(256)) * 7 + b"x" * 252)
    assert path.stat().st_size == 2048
    result = await make_artifact(path)
    return path.read_bytes(), result.digest


def url(server, digest) -> str:
    return str(server.make_url(f"/v1/blobs/{digest}"))


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize("header,start,end", [
    ("bytes=500-1499", 500, 1499),
    ("bytes=500-", 500, 2047),
    ("bytes=-500", 1548, 2047),
    ("bytes=2000-5000", 2000, 2047),
])
async def test_satisfiable_ranges_give_206_with_exact_headers(server, http, blob2048, make_token, header, start, end):
    content, digest = blob2048
    token = await make_token("reader")
    async with http.get(url(server, digest), headers={**bearer(token), "Range": header}) as r:
        body = await r.read()
        assert r.status == 206
        assert r.headers["Content-Length"] == str(end - start + 1)
        assert r.headers["Content-Range"] == f"bytes {start}-{end}/2048"
        assert body == content[start:end + 1]


@pytest.mark.parametrize("header", ["bytes=500-0", "bytes=5000-10000"])
async def test_unsatisfiable_ranges_give_416(server, http, blob2048, make_token, header):
    _, digest = blob2048
    async with http.get(url(server, digest), headers={**bearer(await make_token()), "Range": header}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == "bytes */2048"


async def test_whole_blob_and_its_headers(server, http, blob2048, make_token):
    content, digest = blob2048
    async with http.get(url(server, digest), headers=bearer(await make_token("node"))) as r:
        body = await r.read()
    assert r.status == 200
    assert hashlib.sha256(body).hexdigest() == digest.hex
    assert r.headers["Content-Length"] == "2048"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["ETag"] == f'"{digest}"'
    assert r.headers["Docker-Content-Digest"] == str(digest)
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert "Content-Encoding" not in r.headers


async def test_head_sends_headers_and_no_body(server, http, blob2048, make_token):
    _, digest = blob2048
    async with http.head(url(server, digest), headers=bearer(await make_token("reader"))) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "2048"
        assert r.headers["Docker-Content-Digest"] == str(digest)
        assert await r.read() == b""


async def test_if_none_match_gives_304(server, http, blob2048, make_token):
    _, digest = blob2048
    headers = {**bearer(await make_token()), "If-None-Match": f'"{digest}"'}
    async with http.get(url(server, digest), headers=headers) as r:
        assert r.status == 304
        assert await r.read() == b""


async def test_multi_range_is_answered_with_the_whole_body_never_416(server, http, blob2048, make_token):
    content, digest = blob2048
    headers = {**bearer(await make_token()), "Range": "bytes=0-9,100-109"}
    async with http.get(url(server, digest), headers=headers) as r:
        assert r.status == 200
        assert await r.read() == content


async def test_if_range_with_another_etag_serves_the_whole_body(server, http, blob2048, make_token):
    content, digest = blob2048
    headers = {**bearer(await make_token()), "Range": "bytes=0-9", "If-Range": '"sha256:other"'}
    async with http.get(url(server, digest), headers=headers) as r:
        assert r.status == 200
        assert await r.read() == content


@pytest.mark.parametrize("bad", ["sha256:xyz", "sha256:" + "A" * 64, "md5:abc", "sha256:" + "a" * 63,
                                 "..%2F..%2Fetc%2Fpasswd"])
async def test_invalid_digest_is_400_without_touching_disk(server, http, make_token, bad, settings):
    async with http.get(str(server.make_url("/v1/blobs/")) + bad, headers=bearer(await make_token())) as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/problem+json")
        problem = await r.json()
        assert problem["status"] == 400 and "invalid digest" in problem["detail"]


async def test_unknown_digest_is_404_problem(server, http, make_token):
    digest = Digest("0" * 64)
    async with http.get(url(server, digest), headers=bearer(await make_token())) as r:
        assert r.status == 404
        assert "not in the cache" in (await r.json())["detail"]


@pytest.mark.parametrize("headers,detail", [
    ({}, "Bearer token is required"),
    ({"Authorization": "Bearer mc_nope"}, "unknown or revoked token"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed Authorization"),
])
async def test_missing_or_bad_token_is_401_with_challenge(server, http, blob2048, headers, detail):
    _, digest = blob2048
    async with http.get(url(server, digest), headers=headers) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert detail in (await r.json())["detail"]


async def test_expired_token_is_refused(server, http, blob2048, db, make_token):
    import datetime as dt

    _, digest = blob2048
    token = await make_token("reader", name="shortlived", expires_in=dt.timedelta(seconds=1))
    async with http.head(url(server, digest), headers=bearer(token)) as r:
        assert r.status == 200
    await asyncio.sleep(1.2)
    async with http.get(url(server, digest), headers=bearer(token)) as r:
        assert r.status == 401
        assert "expired" in (await r.json())["detail"]


async def test_revoked_token_stops_working_within_5_seconds(server, http, blob2048, make_token, dsn):
    from conftest import run_cli

    _, digest = blob2048
    token = await make_token("reader", name="to-revoke")
    async with http.head(url(server, digest), headers=bearer(token)) as r:
        assert r.status == 200
    done = await asyncio.to_thread(run_cli, "token", "revoke", "to-revoke", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        async with http.head(url(server, digest), headers=bearer(token)) as r:
            if r.status == 401:
                break
        assert loop.time() < deadline, "revoked token still accepted after 5 s"
        await asyncio.sleep(0.1)


async def test_staged_blob_is_for_admins_and_operators_only(server, http, make_file, db, store, make_token):
    from modelcache.auth import Subject
    from modelcache.imports import ImportRequest, import_path

    async with db.connection() as conn:
        await conn.execute(
            "INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
            "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    path = make_file(prefix=b"GGUF")
    result = await import_path(db, store, ImportRequest.parse(path, "staged", "1"), Subject.local())
    assert result.state == "staged"
    await asyncio.sleep(0.3)  # the catalog follows the registry by notification
    for role, status in [("node", 403), ("reader", 403), ("operator", 200), ("admin", 200)]:
        async with http.get(url(server, result.digest), headers=bearer(await make_token(role))) as r:
            assert r.status == status, role


async def test_quarantined_blob_is_never_served(server, http, blob2048, db, make_token):
    _, digest = blob2048
    async with db.connection() as conn:
        await conn.execute("UPDATE blobs SET state = 'quarantined' WHERE digest = %s", (str(digest),))
    await asyncio.sleep(0.3)
    async with http.get(url(server, digest), headers=bearer(await make_token("admin"))) as r:
        assert r.status == 404
        assert "quarantined" in (await r.json())["detail"]


async def test_anonymous_pulls_only_from_trusted_networks(start_server, make_settings, http, make_file,
                                                          make_artifact):
    path = make_file(prefix=b"GGUF")
    result = await make_artifact(path)
    trusted = await start_server(make_settings(**{"server.trusted_networks": ["127.0.0.0/8"]}))
    async with http.get(str(trusted.make_url(f"/v1/blobs/{result.digest}"))) as r:
        assert r.status == 200
        assert await r.read() == path.read_bytes()
    untrusted = await start_server(make_settings(**{"server.trusted_networks": ["10.0.0.0/8"]}))
    async with http.get(str(untrusted.make_url(f"/v1/blobs/{result.digest}"))) as r:
        assert r.status == 401


async def test_blob_imported_while_running_is_served_without_restart(server, http, make_file, make_artifact,
                                                                    make_token):
    token = await make_token("node")
    path = make_file(prefix=b"GGUF")
    result = await make_artifact(path, model="late")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        async with http.get(url(server, result.digest), headers=bearer(token)) as r:
            if r.status == 200:
                assert await r.read() == path.read_bytes()
                break
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


async def test_serving_survives_postgresql_outage_and_readyz_reports_it(server, http, blob2048, make_token,
                                                                       dsn, pg_admin_dsn):
    content, digest = blob2048
    token = await make_token("reader")
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]

    def outage(allow: bool) -> None:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))

    await asyncio.to_thread(outage, False)
    try:
        async with http.get(str(server.make_url("/readyz"))) as r:
            assert r.status == 503
            assert "database" in await r.text()
        async with http.get(url(server, digest), headers=bearer(token)) as r:
            assert r.status == 200
            assert await r.read() == content
    finally:
        await asyncio.to_thread(outage, True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        async with http.get(str(server.make_url("/readyz"))) as r:
            if r.status == 200:
                break
        assert loop.time() < deadline, "server did not recover after PostgreSQL came back"
        await asyncio.sleep(0.2)


async def test_pulls_update_last_access_in_batches(server, http, blob2048, make_token, db):
    from modelcache.server.keys import CATALOG

    _, digest = blob2048
    async with http.get(url(server, digest), headers=bearer(await make_token())) as r:
        assert r.status == 200
    await server.app[CATALOG].flush_access()
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT b.last_accessed_at AS b, a.last_accessed_at AS a FROM blobs b "
            "JOIN model_artifacts a ON a.sha256 = substr(b.digest, 8) WHERE b.digest = %s", (str(digest),))
        row = await cur.fetchone()
    assert row["b"] is not None and row["a"] is not None
