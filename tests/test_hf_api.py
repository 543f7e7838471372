"""The Hugging Face mirror at the HTTP level: the real server on loopback, a real registry,
snapshots imported through the real import road. The real huggingface_hub client is in
test_hf_clients.py."""

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from yarl import URL

from modelcache import artifacts, preferences
from modelcache.auth import Subject
from modelcache.server.keys import HF_INDEX
from modelcache.server.keys import CATALOG, STORE
from conftest import gguf_bytes, safetensors_bytes

pytestmark = pytest.mark.registry

REPO = "acme/tiny"


def snapshot_files(seed: str) -> dict[str, bytes]:
    """A Hugging Face snapshot: config, two safetensors shards and a file in a subfolder."""
    return {
        "config.json": json.dumps({"architectures": ["TinyForCausalLM"], "seed": seed}).encode(),
        "model-00001-of-00002.safetensors": safetensors_bytes({"a": ("F32", [32, 64])}),
        "model-00002-of-00002.safetensors": safetensors_bytes({"b": ("F16", [16, 16])}),
        "tokenizer/tokenizer.json": json.dumps({"version": "1.0", "seed": seed, "pad": "x" * 300}).encode(),
    }


@pytest.fixture
def make_repo(tmp_path, make_artifact, running_apps):
    """Import a snapshot folder as ``vendor/name`` version ``version``; returns (files, commit id)."""

    async def make(version: str, name: str = "tiny", vendor: str | None = "acme",
                   files: dict[str, bytes] | None = None) -> tuple[dict[str, bytes], str]:
        files = files if files is not None else snapshot_files(f"{vendor}/{name}:{version}")
        root = write_snapshot(tmp_path / "snapshots" / f"{vendor}-{name}-{version}", files)
        result = await make_artifact(root, model=name, version=version, artifact_type="safetensors", vendor=vendor)
        await resync(running_apps)
        return files, result.digest.hex[:40]

    return make


async def resync(apps) -> None:
    """The index follows the registry by notification; tests need not wait for it."""
    for app in apps:
        await app[HF_INDEX].reload()


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def hf_url(server, path: str) -> str:
    return str(server.make_url(f"/hf/{path}"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_model_info_names_main_the_newest_promoted_version(server, http, make_repo, make_token):
    v1, commit1 = await make_repo("1")
    v2, commit2 = await make_repo("2")
    headers = bearer(await make_token("node"))
    for path in (f"api/models/{REPO}", f"api/models/{REPO}/revision/main"):
        async with http.get(hf_url(server, path), headers=headers) as r:
            assert r.status == 200, await r.text()
            info = await r.json()
        assert info["id"] == REPO and info["author"] == "acme"
        assert info["sha"] == commit2
        assert [s["rfilename"] for s in info["siblings"]] == sorted(v2)
        for sibling in info["siblings"]:
            data = v2[sibling["rfilename"]]
            assert sibling["size"] == len(data) == sibling["lfs"]["size"]
            assert sibling["lfs"]["sha256"] == sha256(data)
        assert "xetHash" not in json.dumps(info)
    for revision in ("1", commit1):  # a version, or the commit id snapshot_download asks by
        async with http.get(hf_url(server, f"api/models/{REPO}/revision/{revision}"), headers=headers) as r:
            assert (await r.json())["sha"] == commit1
    assert commit1 != commit2


async def test_a_model_without_vendor_is_a_repo_named_by_its_name_alone(server, http, make_repo, make_token):
    files, commit = await make_repo("1", name="solo", vendor=None)
    headers = bearer(await make_token("node"))
    async with http.get(hf_url(server, "api/models/solo/revision/1"), headers=headers) as r:
        info = await r.json()
        assert (info["id"], info["author"], info["sha"]) == ("solo", None, commit)
    async with http.get(hf_url(server, "api/models/solo/tree/main/tokenizer"), headers=headers) as r:
        assert [e["path"] for e in await r.json()] == ["tokenizer/tokenizer.json"]
    async with http.get(hf_url(server, "solo/resolve/main/tokenizer/tokenizer.json"), headers=headers) as r:
        assert await r.read() == files["tokenizer/tokenizer.json"]


async def test_resolve_head_sends_what_hf_hub_download_reads_and_no_body(server, http, make_repo, make_token):
    files, commit = await make_repo("1")
    data = files["model-00001-of-00002.safetensors"]
    async with http.head(hf_url(server, f"{REPO}/resolve/main/model-00001-of-00002.safetensors"),
                         headers=bearer(await make_token("node"))) as r:
        assert r.status == 200
        assert r.headers["X-Repo-Commit"] == commit
        assert r.headers["ETag"] == f'"{sha256(data)}"'
        assert r.headers["X-Linked-Etag"] == f'"{sha256(data)}"'
        assert r.headers["X-Linked-Size"] == r.headers["Content-Length"] == str(len(data))
        assert r.headers["Accept-Ranges"] == "bytes"
        assert r.headers["Cache-Control"] == "no-cache"  # main moves; a commit id does not
        assert not [h for h in r.headers if h.lower().startswith("x-xet")]
        assert "Link" not in r.headers and "Content-Encoding" not in r.headers
        assert await r.read() == b""


async def test_head_answers_from_memory_while_the_database_is_gone(server, http, make_repo, make_token, db):
    files, commit = await make_repo("1")
    token = await make_token("node")
    await db.close()  # every query now fails; the index and the catalog keep answering
    async with http.head(hf_url(server, f"{REPO}/resolve/{commit}/config.json"), headers=bearer(token)) as r:
        assert r.status == 200
        assert r.headers["X-Linked-Size"] == str(len(files["config.json"]))
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    async with http.get(hf_url(server, f"api/models/{REPO}/tree/main?recursive=true"), headers=bearer(token)) as r:
        assert r.status == 200


async def test_resolve_get_serves_the_bytes_whole_and_in_ranges(server, http, make_repo, make_token):
    files, commit = await make_repo("1")
    data = files["model-00002-of-00002.safetensors"]
    url = hf_url(server, f"{REPO}/resolve/1/model-00002-of-00002.safetensors")
    headers = bearer(await make_token("reader"))
    async with http.get(url, headers=headers) as r:
        assert r.status == 200
        assert await r.read() == data
        assert r.headers["X-Repo-Commit"] == commit
    async with http.get(url, headers={**headers, "Range": "bytes=100-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert r.headers["X-Linked-Size"] == str(len(data))
        assert await r.read() == data[100:]
    async with http.get(url, headers={**headers, "Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    async with http.get(hf_url(server, f"{REPO}/resolve/1/tokenizer/tokenizer.json"), headers=headers) as r:
        assert await r.read() == files["tokenizer/tokenizer.json"]


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_not_found_answers_carry_the_error_code_the_client_reads(server, http, make_repo, make_token,
                                                                       method):
    _, commit = await make_repo("1")
    headers = bearer(await make_token("node"))
    cases = [
        ("acme/nothing/resolve/main/config.json", "RepoNotFound"),
        (f"{REPO}/resolve/7/config.json", "RevisionNotFound"),
        (f"{REPO}/resolve/{'0' * 40}/config.json", "RevisionNotFound"),
        (f"{REPO}/resolve/refs%2Fpr%2F1/config.json", "RevisionNotFound"),
        (f"{REPO}/resolve/main/generation_config.json", "EntryNotFound"),
        (f"{REPO}/resolve/main/tokenizer", "EntryNotFound"),  # a folder is not a file
    ]
    for path, code in cases:
        async with http.request(method, URL(hf_url(server, path), encoded=True), headers=headers) as r:
            assert r.status == 404, path
            assert r.headers["X-Error-Code"] == code, path
            assert r.headers["X-Error-Message"]
            assert r.headers.get("X-Repo-Commit") == (commit if code == "EntryNotFound" else None)
            if method == "GET":
                assert (await r.json())["error"] == r.headers["X-Error-Message"]
    async with http.get(hf_url(server, f"api/models/{REPO}/revision/7"), headers=headers) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    async with http.get(hf_url(server, "api/models/acme/nothing"), headers=headers) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "RepoNotFound")


@pytest.mark.parametrize("path", [
    "..%2F..%2Fetc%2Fpasswd",  # '..' parts, however encoded
    "tokenizer%2F..%2Fconfig.json",
    "tokenizer/%2E%2E/config.json",
    "config.json%00",  # NUL
    "tokenizer%5Ctokenizer.json",  # a backslash
    "%2Fetc%2Fpasswd",  # absolute
    "tokenizer//tokenizer.json",  # an empty part
    "./config.json",
])
async def test_file_paths_are_parsed_and_rejected_never_repaired(server, make_repo, make_token, path):
    await make_repo("1")
    # sent byte for byte: HTTP client libraries normalise dot segments away before they send
    status, headers = await raw_get(server, f"/hf/{REPO}/resolve/main/{path}", await make_token("admin"))
    assert status == 400, headers
    assert "invalid path" in headers["x-error-message"]


async def raw_get(server, target: str, token: str) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = (await reader.read()).split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    finally:
        writer.close()
        await writer.wait_closed()
    fields = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {k.lower(): v for k, v in fields.items()}


async def test_bad_repo_ids_are_rejected(server, http, make_token):
    async with http.get(URL(hf_url(server, "-x/y/resolve/main/config.json"), encoded=True),
                        headers=bearer(await make_token("admin"))) as r:
        assert r.status == 400
        assert "invalid vendor" in r.headers["X-Error-Message"]


async def test_tree_lists_files_and_folders_recursively_in_pages_linked_by_commit(server, http, make_repo,
                                                                                 make_token):
    files, commit = await make_repo("1")
    headers = bearer(await make_token("node"))
    url = hf_url(server, f"api/models/{REPO}/tree/main?recursive=True&expand=False&limit=2")
    entries, pages = [], 0
    while url:
        async with http.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
            assert len(page) <= 2
            entries += page
            pages += 1
            link = r.headers.get("Link")
        url = None
        if link:
            target, rel = link.split(";")
            assert rel.strip() == 'rel="next"'
            url = target.strip()[1:-1]
            assert URL(url).path == f"/hf/api/models/{REPO}/tree/{commit}"  # later pages: the same snapshot
    assert pages == 3
    assert [e["path"] for e in entries] == sorted([*files, "tokenizer"])
    for e in entries:
        if e["type"] == "directory":
            assert e["path"] == "tokenizer" and len(e["oid"]) == 40
            continue
        data = files[e["path"]]
        assert e["type"] == "file" and e["size"] == len(data) and len(e["oid"]) == 40
        assert e["lfs"] == {"oid": sha256(data), "size": len(data), "pointerSize": e["lfs"]["pointerSize"]}
        assert "xetHash" not in e
    async with http.get(hf_url(server, f"api/models/{REPO}/tree/1"), headers=headers) as r:
        assert [e["path"] for e in await r.json()] == sorted([*[p for p in files if "/" not in p], "tokenizer"])
        assert "Link" not in r.headers
    async with http.get(hf_url(server, f"api/models/{REPO}/tree/1/tokenizer"), headers=headers) as r:
        assert [e["path"] for e in await r.json()] == ["tokenizer/tokenizer.json"]
    async with http.get(hf_url(server, f"api/models/{REPO}/tree/1/nothing"), headers=headers) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "EntryNotFound")
    async with http.get(hf_url(server, f"api/models/{REPO}/tree/1?cursor=%25%25"), headers=headers) as r:
        assert r.status == 400


async def test_every_pull_needs_a_token_or_a_trusted_network(server, http, make_repo, start_server,
                                                             make_settings):
    files, _ = await make_repo("1")
    for path in (f"api/models/{REPO}", f"api/models/{REPO}/refs", f"api/models/{REPO}/tree/main",
                 f"{REPO}/resolve/main/config.json"):
        async with http.get(hf_url(server, path)) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" in r.headers["X-Error-Message"]
        async with http.get(hf_url(server, path), headers=bearer("mc_not-a-token")) as r:
            assert r.status == 401
    trusted = await start_server(make_settings(**{"server.trusted_networks": ["127.0.0.0/8"]}))
    await trusted.app[HF_INDEX].reload()
    async with http.get(hf_url(trusted, f"{REPO}/resolve/main/config.json")) as r:
        assert r.status == 200
        assert await r.read() == files["config.json"]


async def test_staged_versions_are_for_admins_and_operators_until_promoted(server, http, make_repo, make_token,
                                                                          db):
    _, commit1 = await make_repo("1")
    await preferences.set_preference(db, "models.import.auto_promote", False, Subject.local())
    staged, commit3 = await make_repo("3")
    await make_repo("1", name="hidden")
    node, reader, admin = [bearer(await make_token(role)) for role in ("node", "reader", "admin")]
    for headers in (node, reader):
        for path in (f"api/models/{REPO}/revision/3", f"api/models/{REPO}/revision/{commit3}",
                     f"api/models/{REPO}/tree/3", f"{REPO}/resolve/3/config.json"):
            async with http.get(hf_url(server, path), headers=headers) as r:
                assert (r.status, r.headers["X-Error-Code"]) == (404, "RevisionNotFound"), path
                assert "staged" in r.headers["X-Error-Message"]
        async with http.get(hf_url(server, "api/models/acme/hidden"), headers=headers) as r:
            assert (r.status, r.headers["X-Error-Code"]) == (404, "RepoNotFound")
        async with http.get(hf_url(server, f"api/models/{REPO}"), headers=headers) as r:
            assert (await r.json())["sha"] == commit1  # main: the newest *promoted* version
    async with http.get(hf_url(server, f"{REPO}/resolve/3/config.json"), headers=admin) as r:
        assert r.status == 200
        assert await r.read() == staged["config.json"]
    async with http.get(hf_url(server, f"api/models/{REPO}"), headers=admin) as r:
        assert (await r.json())["sha"] == commit1
    async with http.get(hf_url(server, "api/models/acme/hidden/revision/1"), headers=admin) as r:
        assert r.status == 200

    # promoted through the real road; the index hears of it by notification, no reload here
    await artifacts.promote(db, server.app[STORE], await _artifact_ref(db, commit3), Subject.local())
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        async with http.get(hf_url(server, f"api/models/{REPO}"), headers=node) as r:
            if (await r.json())["sha"] == commit3:
                break
        assert asyncio.get_running_loop().time() < deadline, "the index did not follow the promotion"
        await asyncio.sleep(0.05)


async def test_refs_are_main_and_each_version_the_subject_may_read(server, http, make_repo, make_token, db):
    _, commit1 = await make_repo("1")
    _, commit2 = await make_repo("2")
    await preferences.set_preference(db, "models.import.auto_promote", False, Subject.local())
    _, commit3 = await make_repo("3")
    _, hidden = await make_repo("1", name="hidden")
    reader, admin = [bearer(await make_token(role)) for role in ("reader", "admin")]

    async def refs(repo: str, headers: dict, query: str = "") -> dict:
        async with http.get(hf_url(server, f"api/models/{repo}/refs{query}"), headers=headers) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    def branch(name: str, commit: str) -> dict:
        return {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}

    # main is the newest promoted version; a staged one is a branch only for those who may read it
    assert await refs(REPO, reader) == {"branches": [branch("main", commit2), branch("2", commit2),
                                                     branch("1", commit1)], "converts": [], "tags": []}
    assert (await refs(REPO, admin))["branches"] == [branch("main", commit2), branch("3", commit3),
                                                     branch("2", commit2), branch("1", commit1)]
    assert (await refs(REPO, reader, "?include_prs=1"))["pullRequests"] == []
    assert await refs("acme/hidden", admin) == {"branches": [branch("1", hidden)], "converts": [], "tags": []}
    async with http.get(hf_url(server, "api/models/acme/hidden/refs"), headers=reader) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "RepoNotFound")
    async with http.get(hf_url(server, "api/models/acme/nothing/refs"), headers=reader) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "RepoNotFound")

    _, solo = await make_repo("1", name="solo", vendor=None)
    assert (await refs("solo", admin))["branches"] == [branch("1", solo)]  # not the model "refs" of vendor "solo"


async def test_llama_cpp_finds_and_downloads_a_gguf_by_refs_tree_and_resolve(server, http, make_repo, make_token,
                                                                            start_server, make_settings, tmp_path):
    """The requests llama.cpp's ``-hf acme/tiny`` makes (common/hf-cache.cpp, common/download.cpp), replayed:
    the refs, the recursive tree at main's commit, then HEAD and GET of ``resolve/{commit}/{path}`` for
    the GGUF it picks, kept as ``blobs/{lfs.oid}``."""
    files = {**snapshot_files("gguf"), "tiny-Q8_0.gguf": gguf_bytes(n_floats=96),
             "tiny-Q4_K_M.gguf": gguf_bytes(n_floats=64)}
    files, commit = await make_repo("1", files=files)
    token = await make_token("node")
    # llama.cpp sends a token to /api only if it looks like the Hub's (hf_ and 34+ letters or digits),
    # never one of ours: without trusted_networks its first request is refused
    async with http.get(hf_url(server, f"api/models/{REPO}/refs")) as r:
        assert r.status == 401
    trusted = await start_server(make_settings(**{"server.trusted_networks": ["127.0.0.0/8"]}))
    await trusted.app[HF_INDEX].reload()
    endpoint = hf_url(trusted, "")  # HF_ENDPOINT with the slash llama.cpp appends
    api_headers = {"User-Agent": "llama-cpp/b1-test", "Accept": "application/json"}

    async with http.get(f"{endpoint}api/models/{REPO}/refs", headers=api_headers) as r:
        assert r.status == 200
        branches = (await r.json())["branches"]
    chosen = next(b for b in branches if b["name"] == "main")
    assert chosen["targetCommit"] == commit

    async with http.get(f"{endpoint}api/models/{REPO}/tree/{chosen['targetCommit']}?recursive=true",
                        headers=api_headers) as r:
        assert r.status == 200
        listed = {e["path"]: (e["lfs"]["oid"] if "lfs" in e else e["oid"]) for e in await r.json()
                  if e["type"] == "file"}
    assert listed == {path: sha256(data) for path, data in files.items()}
    path = next(p for p in listed if p.endswith(".gguf") and "q4_k_m." in p.lower())  # its default quant

    url = f"{endpoint}{REPO}/resolve/{commit}/{path}"
    file_headers = {"User-Agent": "llama-cpp/b1-test", "Authorization": f"Bearer {token}"}  # sent as given
    async with http.head(url, headers=file_headers) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(files[path]))
        assert r.headers["Accept-Ranges"] == "bytes"
    blob = tmp_path / "llama-cache" / "blobs" / listed[path]
    blob.parent.mkdir(parents=True)
    async with http.get(url, headers=file_headers) as r:
        assert r.status == 200
        blob.write_bytes((await r.read())[:100])  # the connection drops after 100 bytes
    async with http.get(url, headers={**file_headers, "Range": "bytes=100-"}) as r:
        assert r.status == 206  # llama.cpp resumes only from a 206
        blob.write_bytes(blob.read_bytes() + await r.read())
    assert blob.read_bytes() == files[path]
    assert sha256(blob.read_bytes()) == blob.name


async def test_evicted_versions_are_not_served(server, http, make_repo, make_token, db):
    _, commit1 = await make_repo("1")
    await make_repo("2")
    await artifacts.evict(db, server.app[STORE], await _artifact_ref(db, commit1), Subject.local(), "test")
    await resync([server.app])
    await server.app[CATALOG].reload()
    async with http.get(hf_url(server, f"{REPO}/resolve/1/config.json"),
                        headers=bearer(await make_token("admin"))) as r:
        assert (r.status, r.headers["X-Error-Code"]) == (404, "RevisionNotFound")
        assert "evicted" in r.headers["X-Error-Message"]


async def test_every_pull_updates_last_access(server, http, make_repo, make_token, db):
    files, commit = await make_repo("1")
    digest = f"sha256:{sha256(files['config.json'])}"
    headers = bearer(await make_token("node"))
    async with http.head(hf_url(server, f"{REPO}/resolve/main/config.json"), headers=headers) as r:
        assert r.status == 200
    await server.app[CATALOG].flush_access()
    async with db.connection() as conn:
        row = await (await conn.execute("SELECT last_accessed_at FROM blobs WHERE digest = %s", (digest,))).fetchone()
    assert row["last_accessed_at"] is None  # a HEAD is not a pull
    async with http.get(hf_url(server, f"{REPO}/resolve/main/config.json"), headers=headers) as r:
        assert await r.read() == files["config.json"]
    await server.app[CATALOG].flush_access()
    async with db.connection() as conn:
        blob = await (await conn.execute("SELECT last_accessed_at FROM blobs WHERE digest = %s", (digest,))).fetchone()
        artifact = await (await conn.execute("SELECT last_accessed_at FROM model_artifacts WHERE sha256 LIKE %s",
                                             (commit + "%",))).fetchone()
    assert blob["last_accessed_at"] is not None
    assert artifact["last_accessed_at"] is not None


async def _artifact_ref(db, commit: str) -> str:
    async with db.connection() as conn:
        row = await (await conn.execute("SELECT sha256 FROM model_artifacts WHERE sha256 LIKE %s",
                                        (commit + "%",))).fetchone()
    return f"sha256:{row['sha256']}"


def write_snapshot(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.mark.parametrize("limit", ["0", "1001", "%C2%B2", "%D9%A1", "9" * 4000, "two"])
async def test_tree_limits_are_ascii_counts_in_range(server, http, make_repo, make_token, limit):
    await make_repo("1")
    url = URL(hf_url(server, f"api/models/{REPO}/tree/main?limit={limit}"), encoded=True)
    async with http.get(url, headers=bearer(await make_token("node"))) as r:
        assert r.status == 400
        assert "invalid limit" in r.headers["X-Error-Message"]
