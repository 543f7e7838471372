"""Uploads (POST /v1/imports) get the content checks of the CLI import and the import folder."""

import hashlib
import os

import pytest

from conftest import gguf_bytes, run_cli

pytestmark = pytest.mark.registry

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


async def upload(http, server, secret, data: bytes, **params):
    async with http.post(str(server.make_url("/v1/imports")), params={"version": "1", **params}, data=data,
                         headers=bearer(secret)) as r:
        return r.status, await r.json()


async def rows(db, sql, *args):
    async with db.connection() as conn:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()


async def assert_nothing_kept(db, store, model):
    assert not any(p.is_file() for p in store.tmp_dir.rglob("*"))
    assert not any(p.is_file() for p in store.blobs_dir.rglob("*"))
    assert await rows(db, "SELECT 1 FROM model_artifacts") == []
    assert await rows(db, "SELECT 1 FROM blobs") == []
    [failed] = await rows(db, "SELECT outcome, reason, details FROM model_audit_log "
                              "WHERE action = 'model_artifact.import'")
    assert failed["outcome"] == "failed" and failed["details"]["model"] == f"{model}:1"
    return failed


async def v2_manifest_status(http, server, secret, model):
    async with http.get(str(server.make_url(f"/v2/library/{model}/manifests/1")),
                        headers={**bearer(secret), "Accept": DOCKER}) as r:
        return r.status


async def test_random_bytes_declared_gguf_are_refused_and_nothing_is_kept(server, http, make_token, store, db):
    secret = await make_token("operator")
    data = os.urandom(64 * 1024)
    status, body = await upload(http, server, secret, data, model="noise", type="gguf", filename="noise.gguf")
    assert status == 422, body
    assert "noise.gguf" in body["detail"] and "declared gguf" in body["detail"]
    assert "none of GGUF, safetensors" in body["detail"]  # what was found
    assert "/tmp/" not in body["detail"]  # the upload's name, not where its bytes waited
    failed = await assert_nothing_kept(db, store, "noise")
    assert "declared gguf" in failed["reason"]
    assert await v2_manifest_status(http, server, secret, "noise") == 404
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with http.get(str(server.make_url(f"/v1/blobs/{digest}")), headers=bearer(secret)) as r:
        assert r.status == 404


async def test_safetensors_declared_gguf_names_what_was_found(server, http, make_token, store, db):
    from conftest import safetensors_bytes

    data = safetensors_bytes({"w": ("F32", [4, 4])})
    status, body = await upload(http, server, await make_token("operator"), data, model="st", type="gguf",
                                filename="st.bin")
    assert status == 422 and "st.bin" in body["detail"] and "safetensors" in body["detail"], body
    await assert_nothing_kept(db, store, "st")


async def test_a_truncated_gguf_without_type_is_refused_with_the_reason(server, http, make_token, store, db):
    secret = await make_token("operator")
    whole = gguf_bytes(n_floats=4096)
    status, body = await upload(http, server, secret, whole[:len(whole) // 2], model="cut", filename="cut.gguf")
    assert status == 422, body
    assert body["detail"].startswith("cut.gguf: truncated GGUF file"), body
    await assert_nothing_kept(db, store, "cut")
    assert await v2_manifest_status(http, server, secret, "cut") == 404


async def test_a_valid_gguf_upload_gets_the_capabilities_the_cli_import_reads(
        server, http, make_token, db, make_file, make_database, tmp_path):
    secret = await make_token("operator")
    src = make_file(content=gguf_bytes(n_floats=1024, arch="qwen2", context_length=4096), name="good.gguf")
    status, body = await upload(http, server, secret, src.read_bytes(), model="good", filename="good.gguf")
    assert status == 201, body
    assert body["artifact_type"] == "gguf"
    [uploaded] = await rows(db, "SELECT v.capabilities FROM model_versions v JOIN models m ON m.id = v.model_id "
                                "WHERE m.name = 'good'")

    other = make_database()  # the same bytes may have one artifact per registry: the CLI imports elsewhere
    done = run_cli("import", str(src), "--model", "good", "--version", "1", "--dsn", other,
                   "--data-dir", str(tmp_path / "cli-data"))
    assert done.returncode == 0, done.stderr
    import psycopg

    with psycopg.connect(other) as conn:
        [(imported,)] = conn.execute("SELECT capabilities FROM model_versions").fetchall()
    assert uploaded["capabilities"] == imported
    assert imported["architecture"] == "qwen2" and imported["context_length"] == 4096

    # served under /v2 as an Ollama model, at once
    async with http.get(str(server.make_url("/v2/library/good/manifests/1")),
                        headers={**bearer(secret), "Accept": DOCKER}) as r:
        assert r.status == 200
        manifest = await r.json(content_type=None)
    assert [layer["digest"] for layer in manifest["layers"]
            if layer["mediaType"] == "application/vnd.ollama.image.model"] == [body["digest"]]
