"""Start-up sweep: blob files a crash left (committed but never registered, or evicted but not unlinked)."""

import pytest

from modelcache import artifacts
from modelcache.auth import Subject
from modelcache.sweep import sweep

pytestmark = pytest.mark.registry


async def test_sweep_removes_what_no_artifact_needs_and_keeps_the_rest(db, store, make_file, make_artifact):
    kept = await make_artifact(make_file(prefix=b"GGUF"), model="kept")
    evicted = await make_artifact(make_file(prefix=b"GGUF"), model="gone")
    orphan = store.ingest_copy(make_file(prefix=b"GGUF"))  # committed, then "crashed" before registering
    async with db.connection() as conn:  # an eviction that committed and crashed before its unlink
        await conn.execute("UPDATE blobs SET state = 'evicted' WHERE digest = %s", (str(evicted.digest),))

    assert await sweep(db, store) == [str(evicted.digest)]  # the orphan is too young: maybe an import in flight
    assert store.path_for(orphan.digest).exists()

    removed = await sweep(db, store, min_age=0)
    assert removed == [str(orphan.digest)]
    assert not store.path_for(orphan.digest).exists() and not store.path_for(evicted.digest).exists()
    assert store.path_for(kept.digest).exists()
    # the registry still knows the kept artifact and serves it
    assert (await artifacts.verify_artifact(db, store, str(kept.digest), Subject.local()))["ok"]


async def test_an_evicted_blob_imported_again_is_not_swept(db, store, make_file, make_artifact):
    src = make_file(prefix=b"GGUF")
    first = await make_artifact(src, model="again")
    await artifacts.evict(db, store, str(first.digest), Subject.local(), reason="test")
    assert not store.path_for(first.digest).exists()
    again = await make_artifact(src, model="again")  # the same bytes, the same model: back in the store
    assert again.digest == first.digest and store.path_for(first.digest).exists()
    assert again.state == "promoted" and again.created  # the evicted artifact is back
    assert await sweep(db, store, min_age=0) == []
    assert store.path_for(first.digest).exists()
