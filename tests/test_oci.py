"""The OCI pull API (/v2/) over real HTTP on loopback, against a real registry and real GGUF files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest
from yarl import URL

from modelcache.digest import Digest
from modelcache.server.keys import SIGNER
from conftest import gguf_bytes

pytestmark = pytest.mark.registry

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def basic(secret: str, user: str = "anyone") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def tinyllama(make_file, make_artifact):
    """A real GGUF imported as meta/tinyllama:1b, with a template, a license and default parameters."""
    path = make_file(content=gguf_bytes(n_floats=4096), name="tinyllama.gguf")
    result = await make_artifact(path, model="tinyllama", version="1b", vendor="meta", inspect=True,
                                 capabilities={"chat_template": TEMPLATE, "license": "MIT License\n"},
                                 default_parameters={"temperature": 0.6, "stop": ["<|user|>"]})
    return path.read_bytes(), result.digest


async def manifest(http, server, name: str, ref: str, headers: dict, accept: str = DOCKER):
    async with http.get(server.make_url(f"/v2/{name}/manifests/{ref}"),
                        headers={**headers, "Accept": accept}) as r:
        return r.status, r.headers, await r.read()


async def errors_of(r) -> list[dict]:
    assert r.headers["Content-Type"].startswith("application/json")
    return (await r.json())["errors"]


async def test_base_endpoint_challenges_and_takes_the_token_as_bearer_or_basic_password(server, http, make_token):
    token = await make_token("node")
    async with http.get(server.make_url("/v2/")) as r:
        assert r.status == 401
        bearer_challenge, basic_challenge = r.headers.getall("WWW-Authenticate")
        realm = f"http://{server.host}:{server.port}/v2/token"
        assert bearer_challenge == f'Bearer realm="{realm}",service="modelcache"'
        assert basic_challenge.startswith("Basic realm=")
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        [error] = await errors_of(r)
        assert error["code"] == "UNAUTHORIZED" and "Basic" in error["detail"]
    for headers in (bearer(token), basic(token), basic(token, user="")):
        async with http.get(server.make_url("/v2/"), headers=headers) as r:
            assert r.status == 200, headers
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    for headers, detail in ((basic("mc_wrong"), "unknown or revoked token"),
                            ({"Authorization": "Basic !!!"}, "malformed Basic"),
                            (basic(""), "no password")):
        async with http.get(server.make_url("/v2/"), headers=headers) as r:
            assert r.status == 401
            assert "Basic realm=" in r.headers.getall("WWW-Authenticate")[1]
            assert detail in (await errors_of(r))[0]["detail"]


async def test_the_bearer_realm_hands_back_the_token_of_the_credentials(server, http, make_token):
    token = await make_token("reader")
    realm = server.make_url("/v2/token").with_query(service="modelcache", scope="repository:meta/tinyllama:pull")
    for headers in (basic(token), bearer(token)):
        async with http.get(realm, headers=headers) as r:
            assert r.status == 200
            body = await r.json()
            assert body["token"] == body["access_token"] == token and body["expires_in"] > 0
    async with http.get(server.make_url("/v2/"), headers=bearer(body["token"])) as r:
        assert r.status == 200
    for headers in ({}, basic("mc_wrong")):
        async with http.get(realm, headers=headers) as r:
            assert r.status == 401
    # what Ollama sends to a realm: its own key's signature, which no modelcache token matches
    ollama = {"Authorization": "AAAAC3NzaC1lZDI1NTE5:c2lnbmF0dXJl"}
    async with http.get(realm.update_query(ts="1", nonce="abc"), headers=ollama) as r:
        assert r.status == 401
        assert "server.trusted_networks" in (await errors_of(r))[0]["detail"]


async def test_v1_still_takes_only_bearer_tokens(server, http, make_token, tinyllama):
    _, digest = tinyllama
    token = await make_token("node")
    async with http.get(server.make_url(f"/v1/blobs/{digest}"), headers=basic(token)) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_gguf_is_served_as_a_deterministic_ollama_model(server, http, make_token, tinyllama):
    content, gguf_digest = tinyllama
    token = await make_token("node")
    status, headers, body = await manifest(http, server, "meta/tinyllama", "1b", bearer(token))
    assert status == 200
    assert headers["Content-Type"] == DOCKER
    assert headers["Docker-Content-Digest"] == sha256(body)
    assert int(headers["Content-Length"]) == len(body)
    doc = json.loads(body)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == DOCKER
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    layers = {layer["mediaType"]: layer for layer in doc["layers"]}
    assert layers["application/vnd.ollama.image.model"] == {
        "mediaType": "application/vnd.ollama.image.model", "digest": str(gguf_digest), "size": len(content)}
    expected = {
        "application/vnd.ollama.image.template": TEMPLATE.encode(),
        "application/vnd.ollama.image.license": b"MIT License\n",
        "application/vnd.ollama.image.params": b'{"stop":["<|user|>"],"temperature":0.6}\n',
    }
    for media_type, data in expected.items():
        assert layers[media_type]["digest"] == sha256(data), media_type
    # every blob the manifest names is served, byte for byte
    blobs = {}
    for d in [doc["config"], *doc["layers"]]:
        async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{d['digest']}"), headers=bearer(token)) as r:
            assert r.status == 200, d
            blobs[d["mediaType"]] = await r.read()
            assert sha256(blobs[d["mediaType"]]) == d["digest"] and len(blobs[d["mediaType"]]) == d["size"]
    assert blobs["application/vnd.ollama.image.model"] == content
    config = json.loads(blobs["application/vnd.docker.container.image.v1+json"])
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["model_families"] == ["llama"] and config["file_type"] == "Q4_K_M"
    assert config["model_type"] == "4K"  # the header's 4096 parameters, as Ollama shows them
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in doc["layers"]]
    # the same registry facts give the same bytes
    assert (await manifest(http, server, "meta/tinyllama", "1b", bearer(token)))[2] == body


async def test_made_blobs_are_served_after_a_restart_without_asking_for_the_manifest(
        start_server, settings, http, make_token, tinyllama):
    token = await make_token("reader")
    first = await start_server(settings)
    _, _, body = await manifest(http, first, "meta/tinyllama", "1b", bearer(token))
    config = json.loads(body)["config"]["digest"]
    await first.close()
    second = await start_server(settings)
    async with http.get(second.make_url(f"/v2/meta/tinyllama/blobs/{config}"), headers=bearer(token)) as r:
        assert r.status == 200
        assert sha256(await r.read()) == config
    assert (await manifest(http, second, "meta/tinyllama", "1b", bearer(token)))[2] == body


async def test_manifest_head_and_get_by_digest(server, http, make_token, tinyllama):
    token = await make_token("node")
    _, headers, body = await manifest(http, server, "meta/tinyllama", "1b", bearer(token))
    digest = headers["Docker-Content-Digest"]
    async with http.head(server.make_url("/v2/meta/tinyllama/manifests/1b"),
                         headers={**bearer(token), "Accept": DOCKER}) as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["Content-Type"] == DOCKER
        assert int(r.headers["Content-Length"]) == len(body)
        assert await r.read() == b""
    status, by_digest_headers, by_digest = await manifest(http, server, "meta/tinyllama", digest, bearer(token))
    assert status == 200 and by_digest == body and by_digest_headers["Docker-Content-Digest"] == digest
    status, _, raw = await manifest(http, server, "meta/tinyllama", f"sha256:{'0' * 64}", bearer(token))
    assert status == 404 and json.loads(raw)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    for bad in ("sha256:xyz", "md5:abc", f"sha256:{'A' * 64}"):
        status, _, raw = await manifest(http, server, "meta/tinyllama", bad, bearer(token))
        assert status == 400 and json.loads(raw)["errors"][0]["code"] == "DIGEST_INVALID", bad


async def test_accept_negotiates_docker_v2_or_oci(server, http, make_token, tinyllama):
    token = await make_token("node")
    _, _, docker = await manifest(http, server, "meta/tinyllama", "1b", bearer(token), accept=DOCKER)
    status, headers, oci = await manifest(http, server, "meta/tinyllama", "1b", bearer(token),
                                          accept=f"{OCI}, {DOCKER}, application/vnd.oci.image.index.v1+json")
    assert status == 200 and headers["Content-Type"] == OCI and headers["Docker-Content-Digest"] == sha256(oci)
    assert json.loads(oci)["mediaType"] == OCI
    assert {k: v for k, v in json.loads(oci).items() if k != "mediaType"} == \
        {k: v for k, v in json.loads(docker).items() if k != "mediaType"}
    # the client rates Docker v2 higher: it gets it
    _, headers, _ = await manifest(http, server, "meta/tinyllama", "1b", bearer(token),
                                   accept=f"{DOCKER}, {OCI};q=0.5")
    assert headers["Content-Type"] == DOCKER
    for accept in ("*/*", "application/*", ""):
        _, headers, _ = await manifest(http, server, "meta/tinyllama", "1b", bearer(token), accept=accept)
        assert headers["Content-Type"] == DOCKER, accept
    status, _, raw = await manifest(http, server, "meta/tinyllama", "1b", bearer(token),
                                    accept="application/vnd.oci.image.index.v1+json")
    assert status == 404 and json.loads(raw)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # by digest, each representation is served as stored, with its own media type, whatever Accept says
    for accept in (OCI, DOCKER, "application/vnd.oci.image.index.v1+json"):
        status, headers, raw = await manifest(http, server, "meta/tinyllama", sha256(oci), bearer(token),
                                              accept=accept)
        assert status == 200 and raw == oci and headers["Content-Type"] == OCI, accept


async def test_by_digest_the_docker_manifest_is_served_to_an_oci_only_accept(server, http, make_token, tinyllama):
    """What the OCI conformance suite's pull tests do: a digest names those bytes, whatever Accept says."""
    token = await make_token("node")
    _, headers, docker = await manifest(http, server, "meta/tinyllama", "1b", bearer(token), accept=DOCKER)
    digest = headers["Docker-Content-Digest"]
    status, headers, raw = await manifest(http, server, "meta/tinyllama", digest, bearer(token), accept=OCI)
    assert status == 200 and raw == docker
    assert headers["Content-Type"] == DOCKER and headers["Docker-Content-Digest"] == digest == sha256(raw)
    async with http.head(server.make_url(f"/v2/meta/tinyllama/manifests/{digest}"),
                         headers={**bearer(token), "Accept": OCI}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == DOCKER
        assert r.headers["Docker-Content-Digest"] == digest and int(r.headers["Content-Length"]) == len(docker)


@pytest.mark.parametrize("path,status,code", [
    ("/v2/Meta/tinyllama/manifests/1b", 400, "NAME_INVALID"),
    ("/v2/meta/tiny..llama/manifests/1b", 400, "NAME_INVALID"),
    ("/v2/meta/-tinyllama/tags/list", 400, "NAME_INVALID"),
    ("/v2/meta/tinyllama/extra/manifests/1b", 404, "NAME_UNKNOWN"),
    ("/v2/tinyllama/manifests/1b", 404, "NAME_UNKNOWN"),
    ("/v2/other/tinyllama/manifests/1b", 404, "NAME_UNKNOWN"),
    ("/v2/meta/tinyllama/manifests/-1b", 404, "MANIFEST_UNKNOWN"),
    ("/v2/meta/tinyllama/manifests/2b", 404, "MANIFEST_UNKNOWN"),
    ("/v2/meta/tinyllama/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
    (f"/v2/meta/tinyllama/blobs/sha256:{'0' * 64}", 404, "BLOB_UNKNOWN"),
    ("/v2/meta/tinyllama/blobs/uploads/", 404, "BLOB_UPLOAD_UNKNOWN"),
    ("/v2/meta/tinyllama/tags/list?n=-1", 400, "UNSUPPORTED"),
    ("/v2/meta/tinyllama/tags/list?n=many", 400, "UNSUPPORTED"),
    ("/v2/meta/tinyllama/tags/list?n=%C2%B2", 400, "UNSUPPORTED"),  # '²' is a digit to str.isdigit
    ("/v2/_catalog?n=" + "9" * 4000, 400, "UNSUPPORTED"),
    ("/v2/meta/tinyllama", 404, "UNSUPPORTED"),
])
async def test_names_tags_and_digests_are_validated_with_oci_error_codes(server, http, make_token, tinyllama,
                                                                        path, status, code):
    token = await make_token("admin")
    async with http.get(server.make_url(path), headers=bearer(token)) as r:
        assert r.status == status
        [error] = await errors_of(r)
        assert error["code"] == code
        assert error["message"] and error["detail"]


async def test_pushes_are_refused_as_unsupported(server, http, make_token):
    token = await make_token("admin")
    for method, path in (("POST", "/v2/meta/tinyllama/blobs/uploads/"), ("PUT", "/v2/meta/tinyllama/manifests/1"),
                         ("DELETE", "/v2/meta/tinyllama/manifests/1")):
        async with http.request(method, server.make_url(path), headers=bearer(token)) as r:
            assert r.status == 405
            assert (await errors_of(r))[0]["code"] == "UNSUPPORTED"


async def test_repository_names_are_lower_case_vendor_or_library(server, http, make_file, make_artifact, make_token):
    await make_artifact(make_file(content=gguf_bytes()), model="Phi-3-mini.Q4_K_M", version="latest")
    await make_artifact(make_file(content=gguf_bytes()), model="Bad..name", version="1")
    token = await make_token("reader")
    status, headers, _ = await manifest(http, server, "library/phi-3-mini.q4_k_m", "latest", bearer(token))
    assert status == 200 and headers["Content-Type"] == DOCKER
    async with http.get(server.make_url("/v2/_catalog"), headers=bearer(token)) as r:
        assert (await r.json()) == {"repositories": ["library/phi-3-mini.q4_k_m"]}  # Bad..name fits no OCI name


async def test_tags_and_catalog_are_paged_with_link(server, http, make_file, make_artifact, make_token):
    for version in ("1b", "3b", "8b", "8b-instruct", "has+plus"):
        await make_artifact(make_file(content=gguf_bytes()), model="llama", version=version, vendor="meta")
    for model in ("alpha", "beta"):
        await make_artifact(make_file(content=gguf_bytes()), model=model, version="1")
    token = await make_token("reader")

    async def get(path):
        async with http.get(server.make_url(path), headers=basic(token)) as r:
            assert r.status == 200, await r.text()
            return await r.json(), r.headers.get("Link")

    body, link = await get("/v2/meta/llama/tags/list")
    assert body == {"name": "meta/llama", "tags": ["1b", "3b", "8b", "8b-instruct"]} and link is None
    body, link = await get("/v2/meta/llama/tags/list?n=2")
    assert body["tags"] == ["1b", "3b"]
    assert link == '</v2/meta/llama/tags/list?n=2&last=3b>; rel="next"'
    body, link = await get(link[1:link.index(">")])
    assert body["tags"] == ["8b", "8b-instruct"] and link is None
    body, link = await get("/v2/meta/llama/tags/list?n=0")
    assert body["tags"] == [] and link is None
    body, link = await get("/v2/meta/llama/tags/list?last=8b")
    assert body["tags"] == ["8b-instruct"]
    body, link = await get("/v2/_catalog?n=2")
    assert body == {"repositories": ["library/alpha", "library/beta"]}
    assert link == '</v2/_catalog?n=2&last=library/beta>; rel="next"'
    body, link = await get(link[1:link.index(">")])
    assert body == {"repositories": ["meta/llama"]} and link is None


async def test_staged_models_are_for_admins_and_operators_only(server, http, db, make_file, make_artifact,
                                                               make_token):
    async with db.connection() as conn:
        await conn.execute(
            "INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
            "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    await make_artifact(make_file(content=gguf_bytes()), model="draft", version="1", vendor="acme")
    node, operator = await make_token("node"), await make_token("operator")
    status, _, raw = await manifest(http, server, "acme/draft", "1", bearer(node))
    assert status == 403 and json.loads(raw)["errors"][0]["code"] == "DENIED"
    status, _, body = await manifest(http, server, "acme/draft", "1", bearer(operator))
    assert status == 200
    config = json.loads(body)["config"]["digest"]
    for token, expected in ((node, 403), (operator, 200)):
        async with http.get(server.make_url(f"/v2/acme/draft/blobs/{config}"), headers=bearer(token)) as r:
            assert r.status == expected
    async with http.get(server.make_url("/v2/acme/draft/tags/list"), headers=bearer(node)) as r:
        assert r.status == 404 and (await errors_of(r))[0]["code"] == "NAME_UNKNOWN"


async def made_files(db) -> dict[str, str]:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT path, blob_digest FROM artifact_files WHERE starts_with(path, '.ollama/')")
        return {r["path"]: r["blob_digest"] for r in await cur.fetchall()}


async def test_a_capability_patch_makes_the_new_manifest_before_any_pull(server, http, db, make_token, tinyllama):
    token, admin = await make_token("node"), await make_token("admin")
    _, headers, before = await manifest(http, server, "meta/tinyllama", "1b", bearer(token))
    async with db.connection() as conn:
        version_id = (await (await conn.execute("SELECT id FROM model_versions")).fetchone())["id"]
    async with http.patch(server.make_url(f"/v1/versions/{version_id}"), headers=bearer(admin),
                          json={"default_parameters": {"temperature": 0.2, "stop": None},
                                "capabilities": {"architecture": "qwen2"}}) as r:
        assert r.status == 200, await r.text()
    # made as the PATCH answered, not by a GET: the rows already name the new manifest and config
    made = await made_files(db)
    assert made[".ollama/params.json"] == sha256(b'{"temperature":0.2}\n')
    _, headers2, after = await manifest(http, server, "meta/tinyllama", "1b", bearer(token))
    assert after != before and sha256(after) == made[".ollama/docker-manifest.json"]
    doc = json.loads(after)
    params = [x for x in doc["layers"] if x["mediaType"] == "application/vnd.ollama.image.params"]
    assert params[0]["digest"] == sha256(b'{"temperature":0.2}\n')
    assert doc["config"]["digest"] == made[".ollama/config.json"]
    async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{doc['config']['digest']}"),
                        headers=bearer(token)) as r:
        assert r.status == 200 and json.loads(await r.read())["model_family"] == "qwen2"
    status, _, _ = await manifest(http, server, "meta/tinyllama", headers["Docker-Content-Digest"], bearer(token))
    assert status == 404  # the old manifest is gone with the facts it was made from
    status, _, raw = await manifest(http, server, "meta/tinyllama", headers2["Docker-Content-Digest"], bearer(token))
    assert status == 200 and raw == after


async def test_blob_ranges_and_ollamas_location(server, http, make_token, tinyllama):
    content, digest = tinyllama
    token = await make_token("node")
    url = server.make_url(f"/v2/meta/tinyllama/blobs/{digest}")
    async with http.get(url, headers={**bearer(token), "Range": "bytes=100-1099"}) as r:
        assert r.status == 206 and await r.read() == content[100:1100]
        assert r.headers["Content-Range"] == f"bytes 100-1099/{len(content)}"
        assert "Location" not in r.headers
    async with http.get(url, headers={**bearer(token), "Range": f"bytes={len(content)}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(content)}"
    async with http.head(url, headers=bearer(token)) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(content)
        assert r.headers["Docker-Content-Digest"] == str(digest) and r.headers["Accept-Ranges"] == "bytes"
    async with http.get(url, headers=bearer(token)) as r:
        assert r.status == 200 and await r.read() == content
        location = URL(r.headers["Location"])
    assert location.path == url.path and location.query["issued_to"]
    # the signed URL needs no credentials, and a single range is always a 206 of exactly it
    async with http.get(location, headers={"Range": "bytes=0-15"}) as r:
        assert r.status == 206 and await r.read() == content[:16]
    for bad in ({"signature": "é" * 64}, {"expires": "١٢٣"}, {"signature": ""}):
        async with http.get(location.update_query(bad), headers={"Range": "bytes=0-15"}) as r:
            assert r.status == 401 and "malformed signed URL" in (await errors_of(r))[0]["detail"], bad
    tampered = location.update_query(issued_to="someone-else")
    async with http.get(tampered, headers={"Range": "bytes=0-15"}) as r:
        assert r.status == 401 and "does not match" in (await errors_of(r))[0]["detail"]
    other = Digest("0" * 64)
    async with http.get(location.with_path(f"/v2/meta/tinyllama/blobs/{other}"), headers={"Range": "bytes=0-15"}) as r:
        assert r.status == 401  # the signature is for one digest only
    async with http.get(url, headers={"Range": "bytes=0-15"}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer realm=")


async def test_signed_urls_expire_and_die_with_their_token(server, http, db, make_token, tinyllama, dsn):
    from conftest import run_cli

    _, digest = tinyllama
    token = await make_token("node", name="short")
    url = server.make_url(f"/v2/meta/tinyllama/blobs/{digest}")
    expired = url.with_query(server.app[SIGNER].sign(digest, "short", now=0))
    async with http.get(expired, headers={"Range": "bytes=0-3"}) as r:
        assert r.status == 401 and "expired" in (await errors_of(r))[0]["detail"]
    async with http.get(url, headers=bearer(token)) as r:
        location = r.headers["Location"]
    done = await asyncio.to_thread(run_cli, "token", "revoke", "short", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    for _ in range(100):
        async with http.get(location, headers={"Range": "bytes=0-3"}) as r:
            if r.status == 401:
                assert "revoked" in (await errors_of(r))[0]["detail"]
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("a URL signed for a revoked token still works after 10 s")


async def test_anonymous_trusted_clients_get_their_plain_url_as_location(start_server, make_settings, http,
                                                                        tinyllama):
    content, digest = tinyllama
    srv = await start_server(make_settings(**{"server.trusted_networks": ["127.0.0.0/8"]}))
    url = srv.make_url(f"/v2/meta/tinyllama/blobs/{digest}")
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == content
        assert URL(r.headers["Location"]) == url
    status, _, _ = await manifest(http, srv, "meta/tinyllama", "1b", {})
    assert status == 200


async def test_pulls_update_last_access(server, http, db, make_token, tinyllama):
    from modelcache.server.keys import CATALOG

    _, digest = tinyllama
    token = await make_token("node")
    async with http.get(server.make_url(f"/v2/meta/tinyllama/blobs/{digest}"),
                        headers={**bearer(token), "Range": "bytes=0-9"}) as r:
        assert r.status == 206
    await server.app[CATALOG].flush_access()
    async with db.connection() as conn:
        cur = await conn.execute("SELECT last_accessed_at FROM model_artifacts WHERE sha256 = %s", (digest.hex,))
        assert (await cur.fetchone())["last_accessed_at"] is not None


async def test_concurrent_first_pulls_agree_on_one_manifest(server, http, make_token, tinyllama):
    token = await make_token("node")
    answers = await asyncio.gather(*(manifest(http, server, "meta/tinyllama", "1b", bearer(token),
                                              accept=OCI if i % 2 else DOCKER) for i in range(8)))
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, _, body in answers}) == 2  # one Docker v2 and one OCI manifest, each made once
    doc = json.loads(answers[0][2])
    for d in [doc["config"], *doc["layers"]]:
        async with http.head(server.make_url(f"/v2/meta/tinyllama/blobs/{d['digest']}"), headers=bearer(token)) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == d["size"]
