"""The blob server's in-memory catalog: loaded whole once, then followed change by change."""

import asyncio
import logging
import re

import pytest

from modelcache.digest import Digest
from modelcache.server.catalog import Catalog
from modelcache.server.keys import CATALOG

pytestmark = pytest.mark.registry


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


async def listener_pids(db) -> list[int]:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %%'")
        return [r["pid"] for r in await cur.fetchall()]


async def test_change_missed_while_not_listening_is_read_after_reconnecting_without_a_full_reload(
        server, http, make_file, make_artifact, make_token, db, caplog):
    caplog.set_level(logging.INFO, logger="modelcache.server.catalog")
    admin = await make_token("admin")
    kept, changed = await make_artifact(make_file(prefix=b"GGUF")), await make_artifact(make_file(prefix=b"GGUF"))
    for result in (kept, changed):
        async with http.get(f"{server.make_url('/v1/blobs/')}{result.digest}", headers=bearer(admin)) as r:
            assert r.status == 200
    catalog = server.app[CATALOG]
    await catalog.catch_up()  # what the imports changed is read: the next catch-up reads only what follows
    loads = catalog.full_loads

    # Drop the LISTEN connection and change a blob before it is back (it retries after a second).
    pids = await listener_pids(db)
    assert len(pids) == 1
    async with db.connection() as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        for _ in range(100):
            if pids[0] not in await listener_pids(db):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the LISTEN backend did not go away")
        await conn.execute("UPDATE blobs SET state = 'quarantined' WHERE digest = %s", (str(changed.digest),))

    deadline = asyncio.get_running_loop().time() + 15
    caught_up = re.compile(r"caught up on \d+ blobs changed while not listening")
    while True:  # (the line is logged once the followers were told too, a moment after the 404)
        async with http.head(f"{server.make_url('/v1/blobs/')}{changed.digest}", headers=bearer(admin)) as r:
            if r.status == 404 and caught_up.search(caplog.text):
                break
        assert asyncio.get_running_loop().time() < deadline, \
            f"the change was not picked up after reconnecting: {r.status}\n{caplog.text}"
        await asyncio.sleep(0.1)
    async with http.head(f"{server.make_url('/v1/blobs/')}{kept.digest}", headers=bearer(admin)) as r:
        assert r.status == 200
    assert catalog.full_loads == loads, "the catalog reloaded every blob instead of reading what changed"


async def test_catch_up_reads_only_what_changed_and_reloads_whole_for_an_unknown_mark(db, make_file, make_artifact):
    first, second = await make_artifact(make_file(prefix=b"GGUF")), await make_artifact(make_file(prefix=b"GGUF"))
    catalog = Catalog(db)
    await catalog.reload()
    assert catalog.full_loads == 1 and catalog.blob_count() == 2
    assert (await catalog.catch_up()) == []  # nothing changed since the load

    async with db.connection() as conn:
        await conn.execute("UPDATE blobs SET state = 'evicted' WHERE digest = %s", (str(second.digest),))
        await conn.execute("INSERT INTO blobs (digest, size_bytes, xxh3_128) VALUES (%s, %s, %s)",
                           ("sha256:" + "ab" * 32, 5 << 40, "0" * 32))
    assert sorted(await catalog.catch_up()) == sorted([str(second.digest), "sha256:" + "ab" * 32])
    assert catalog.full_loads == 1
    big = catalog.blob(Digest.parse("sha256:" + "ab" * 32))
    assert (big.size, big.state, big.promoted) == (5 << 40, "present", False)
    assert catalog.blob(second.digest).state == "evicted"
    assert catalog.blob(first.digest).promoted and catalog.blob(first.digest).state == "present"
    assert catalog.count_by_state() == {"present": 2, "quarantined": 0, "evicted": 1}

    catalog._mark = str(1 << 60)  # a mark from another database's future: the log cannot answer
    assert (await catalog.catch_up()) == []
    assert catalog.full_loads == 2 and catalog.blob_count() == 3
