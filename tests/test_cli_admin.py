"""The admin verbs of the CLI, against a real server over HTTP (MODELCACHE_URL / MODELCACHE_TOKEN)."""

import asyncio
import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.registry


@pytest.fixture
async def env(server, make_token):
    return {"MODELCACHE_URL": str(server.make_url("")).rstrip("/"), "MODELCACHE_TOKEN": await make_token("admin")}


async def cli(env, *args):
    return await asyncio.to_thread(run_cli, *args, env=env)


async def test_models_artifacts_tables_and_json(env, make_file, make_artifact):
    result = await make_artifact(make_file(prefix=b"GGUF"), model="llama3", version="8b", vendor="meta")
    done = await cli(env, "artifacts")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[:2]
    assert header.split()[:3] == ["DIGEST", "MODEL", "TYPE"]
    assert "meta/llama3:8b" in row and "promoted" in row
    done = await cli(env, "artifacts", "--json")
    assert json.loads(done.stdout)["artifacts"][0]["digest"] == str(result.digest)
    done = await cli(env, "models", "--json")
    assert json.loads(done.stdout)["models"][0]["name"] == "llama3"


async def test_pin_evict_refused_then_unpin_evict(env, make_file, make_artifact, store):
    result = await make_artifact(make_file(prefix=b"GGUF"))
    assert (await cli(env, "pin", str(result.digest))).returncode == 0
    refused = await cli(env, "evict", str(result.digest))
    assert refused.returncode == 1 and "pinned" in refused.stderr
    assert (await cli(env, "unpin", str(result.digest))).returncode == 0
    done = await cli(env, "evict", str(result.digest))
    assert done.returncode == 0 and "freed" in done.stdout
    assert not store.path_for(result.digest).exists()


async def test_prefs_get_set_and_audit(env):
    done = await cli(env, "prefs", "set", "models.cache.evict_policy", "largest_first", "--reason", "big disks")
    assert done.returncode == 0, done.stderr
    assert 'models.cache.evict_policy = "largest_first" (version 1)' in done.stdout
    stale = await cli(env, "prefs", "set", "models.cache.evict_policy", "lru", "--expected-version", "0")
    assert stale.returncode == 1 and "409" in stale.stderr
    bad = await cli(env, "prefs", "set", "models.cache.max_bytes", "lots")
    assert bad.returncode == 2 and "expected a number" in bad.stderr
    done = await cli(env, "prefs", "get", "models.cache.evict_policy", "--json")
    assert json.loads(done.stdout)["value"] == "largest_first"
    done = await cli(env, "audit", "--action", "preference.update")
    assert "big disks" in done.stdout
    done = await cli(env, "prefs", "history")
    assert done.returncode == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if "evict_policy" in line]
    assert '"lru"' in row and '"largest_first"' in row and "big disks" in row


async def test_verify_all_and_missing_token(env, make_file, make_artifact, store):
    await make_artifact(make_file(prefix=b"GGUF"))
    done = await cli(env, "verify", "--all")
    assert done.returncode == 0 and "1 blobs verified" in done.stdout
    no_token = await cli({"MODELCACHE_URL": env["MODELCACHE_URL"]}, "artifacts")
    assert no_token.returncode == 2 and "MODELCACHE_TOKEN" in no_token.stderr


async def test_tokens_lists_every_token_across_pages(env, db, dsn):
    """More tokens than the API answers at once (200): `modelcache tokens` follows next_cursor to the end,
    and `modelcache token list` on the cache host lists them all too."""
    from modelcache.auth import Role, Subject
    from modelcache.tokens import create_token

    names = [f"bulk-{i:03}" for i in range(205)]
    for name in names:
        await create_token(db, name=name, role=Role.READER, subject=Subject.local())
    done = await cli(env, "tokens", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    listed = [t["name"] for t in body["tokens"]]
    assert listed[1:] == names and len(listed) == 206 and body["next_cursor"] is None
    done = await cli(env, "tokens")
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["NAME", "ROLE", "NODE", "EXPIRES", "REVOKED"] and len(rows) == 206
    assert rows[-1].split()[:2] == ["bulk-204", "reader"]
    done = await asyncio.to_thread(run_cli, "token", "list", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 206 and "bulk-204" in done.stdout.splitlines()[-1]
