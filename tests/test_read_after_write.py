"""Read-after-write: what an import answered is served at once, by this server and by any other.

No sleeps and no catalog resync here: each GET follows the write immediately, as a node's pull
right after an operator's upload (or another process's import) would.
"""

import asyncio
import hashlib
import os
import time

import pytest

from conftest import gguf_bytes, safetensors_bytes
from modelcache.auth import Subject
from modelcache.digest import Digest
from modelcache.imports import ImportRequest, import_path
from modelcache.server import catalog as catalog_module
from modelcache.server.catalog import MISS_LOOKUPS, MISS_WAIT
from modelcache.server.keys import CATALOG

pytestmark = pytest.mark.registry

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


async def test_every_upload_is_served_by_the_same_server_as_it_answers(server, http, make_token):
    secret = await make_token("operator")
    for i in range(10):
        data = gguf_bytes(n_floats=256)
        async with http.post(str(server.make_url("/v1/imports")), params={"model": f"m{i}", "version": "1"},
                             data=data, headers=bearer(secret)) as r:
            assert r.status == 201, await r.text()
            digest = (await r.json())["digest"]
        async with http.get(str(server.make_url(f"/v1/blobs/{digest}")), headers=bearer(secret)) as r:
            assert r.status == 200, f"upload {i}: {r.status}"
            assert await r.read() == data
        # and the Ollama manifest the import derived, with every blob it names
        async with http.get(str(server.make_url(f"/v2/library/m{i}/manifests/1")),
                            headers={**bearer(secret), "Accept": DOCKER}) as r:
            assert r.status == 200, f"upload {i}: manifest {r.status}"
            manifest = await r.json(content_type=None)
        for d in [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]:
            async with http.head(str(server.make_url(f"/v2/library/m{i}/blobs/{d}")), headers=bearer(secret)) as r:
                assert r.status == 200, f"upload {i}: blob {d} {r.status}"


async def test_another_process_import_is_served_on_the_first_get(server, http, make_token, dsn, tmp_path, store):
    """An import through the library on a connection pool of its own (as ``modelcache import`` in
    another process), then a GET at once: the catalog has not heard of it, the registry has."""
    from modelcache.db import Database

    secret = await make_token("node")
    other = Database(dsn)
    await other.open()
    try:
        for i in range(10):
            path = tmp_path / f"w{i}.safetensors"
            path.write_bytes(safetensors_bytes({"w": ("F32", [8, 8])}))
            result = await import_path(other, store, ImportRequest.parse(path, f"st{i}", "1", inspect=True),
                                       Subject.local())
            for url in (f"/v1/blobs/{result.digest}", f"/v2/library/st{i}/blobs/{result.digest}"):
                async with http.get(str(server.make_url(url)), headers=bearer(secret)) as r:
                    assert r.status == 200, f"import {i}: {url} {r.status}"
                    assert await r.read() == path.read_bytes()
    finally:
        await other.close()


async def test_concurrent_misses_for_one_digest_share_one_registry_lookup(server, http, make_token, monkeypatch):
    # a loaded machine may take over a second for these 41 requests: remember the absence longer
    # than the test can take, so what is asserted is the sharing, not the machine's speed
    monkeypatch.setattr(catalog_module, "MISS_REMEMBERED", 60.0)
    secret = await make_token("node")
    catalog = server.app[CATALOG]
    unknown = "sha256:" + hashlib.sha256(os.urandom(16)).hexdigest()
    before = catalog.registry_lookups

    async def get(url):
        async with http.get(str(server.make_url(url)), headers=bearer(secret)) as r:
            return r.status

    statuses = await asyncio.gather(*(get(f"/v1/blobs/{unknown}") for _ in range(20)),
                                    *(get(f"/v2/library/x/blobs/{unknown}") for _ in range(20)))
    assert statuses == [404] * 40
    assert catalog.registry_lookups - before == 1
    # the answer is remembered for a moment: asking again costs nothing
    assert await get(f"/v1/blobs/{unknown}") == 404 and catalog.registry_lookups - before == 1


async def test_misses_while_the_registry_is_slow_are_bounded_and_answered_404_at_once(server, http, make_token, db):
    """With every read of ``blobs`` waiting on a lock (a slow database), 200 distinct unknown digests
    hold only a few lookups, and each caller is answered 404 within a moment, not a statement timeout."""
    secret = await make_token("node")
    catalog = server.app[CATALOG]
    before = catalog.registry_lookups

    async def head(digest):
        async with http.head(str(server.make_url(f"/v1/blobs/{digest}")), headers=bearer(secret)) as r:
            return r.status

    digests = ["sha256:" + hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(200)]
    async with db.transaction() as conn:
        await conn.execute("LOCK TABLE blobs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        statuses = await asyncio.gather(*(head(d) for d in digests))
        took = time.monotonic() - started
    assert statuses == [404] * 200
    assert took < MISS_WAIT + 2.0, f"200 misses took {took:.1f}s while the registry was slow"
    assert 1 <= catalog.registry_lookups - before <= MISS_LOOKUPS
    assert catalog.blob(Digest.parse(digests[0])) is None  # a miss leaves no entry behind
