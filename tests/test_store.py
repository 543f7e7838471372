"""The blob store on real files: hash-then-rename, read-only blobs, no-op recommits, crash leftovers."""

import hashlib
import stat

import pytest

from modelcache.digest import Digest
from modelcache.errors import ChecksumError, NotFound
from modelcache.store import BlobStore


def test_layout_and_path_for(store, settings):
    digest = Digest("ab" + "0" * 62)
    assert store.path_for(digest) == settings.data_dir / "blobs" / "sha256" / "ab" / digest.hex
    for sub in ("blobs/sha256", "tmp", "quarantine"):
        assert (settings.data_dir / sub).is_dir()


def test_copy_hashes_in_one_pass_and_commits_read_only(store, make_file):
    src = make_file(size=3 * 1024 * 1024 + 17)
    before = src.stat()
    blob = store.ingest_copy(src)
    data = src.read_bytes()
    assert blob.digest.hex == hashlib.sha256(data).hexdigest()
    assert blob.size == len(data) and len(blob.xxh3) == 32
    assert blob.path.read_bytes() == data
    assert stat.S_IMODE(blob.path.stat().st_mode) == 0o444
    assert src.stat().st_mode == before.st_mode and src.read_bytes() == data  # the user's file is untouched
    assert list(store.tmp_dir.iterdir()) == []


def test_committing_existing_content_is_a_noop(store, make_file):
    src = make_file()
    first = store.ingest_copy(src)
    inode = first.path.stat().st_ino
    second = store.ingest_copy(src)
    assert second == first and first.path.stat().st_ino == inode
    assert list(store.tmp_dir.iterdir()) == []


def test_expected_digest_mismatch_keeps_nothing(store, make_file):
    src = make_file()
    wrong = Digest("0" * 64)
    with pytest.raises(ChecksumError) as err:
        store.ingest_copy(src, expected=wrong)
    assert err.value.expected == str(wrong)
    assert err.value.actual == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert list(store.tmp_dir.iterdir()) == []
    assert not any(store.blobs_dir.rglob("*/*"))


def test_link_ingest_moves_without_copy_and_leaves_source_until_caller_removes_it(store, make_file):
    src = make_file()
    blob = store.ingest_link(src)
    assert blob.path.stat().st_ino == src.stat().st_ino  # same inode: no second copy
    assert src.exists()


def test_missing_source_is_named(store, tmp_path):
    with pytest.raises(NotFound, match="nope.bin: no such file"):
        store.ingest_copy(tmp_path / "nope.bin")
    with pytest.raises(NotFound, match="nope.bin: no such file"):
        store.ingest_link(tmp_path / "nope.bin")


def test_start_up_removes_crash_leftovers_but_not_live_writes(settings):
    store = BlobStore(settings.data_dir)
    store.prepare()
    leftover = store.tmp_dir / "dead.partial"
    leftover.write_bytes(b"half a blob")
    with store.temp() as live:
        live.write(b"being written")
        assert store.prepare() == 1
        assert not leftover.exists()
        assert live.path.exists()


def test_rehash_and_quarantine(store, make_file):
    blob = store.ingest_copy(make_file())
    assert store.rehash(blob.digest).digest == blob.digest
    moved = store.quarantine(blob.digest)
    assert moved.exists() and not blob.path.exists()
