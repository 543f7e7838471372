"""An ``ollama`` source behind a registry's token auth: Debian's ``docker-registry`` (distribution 2.8)
configured with ``auth: token``, and a token server on loopback that signs RS256 JWTs with a key whose
self-signed certificate is the registry's ``rootcertbundle`` (the token's header carries it as ``x5c``).

The registry answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; we GET the
realm with Basic credentials from the source's config, and ask again with the token. The realm is on
another port than the registry, so another origin: the hop policy must allow it by a URL prefix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from aiohttp import web

from modelcache import config
from modelcache.downloads.registry_auth import challenge_params
from test_download_sources import (REGISTRY, SKOPEO, Registry, assert_pulled_as_ollama, download, push_ollama_model,
                                   sha256, staging_left)
from test_downloads import allow, free_port, worker  # noqa: F401
from test_oci_clients import DOCKER

pytestmark = [pytest.mark.registry, pytest.mark.e2e]

SERVICE = "modelcache-test-registry"
ISSUER = "modelcache-test-issuer"
USER, PASSWORD = "alice", "s3cret-password-7f1c"
PASSWORD_ENV = "MC_TEST_REGISTRY_PASSWORD"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A distribution token server on loopback: Basic credentials in, ``{"token": <RS256 JWT>}`` out.

    The key and its self-signed certificate are made with openssl; the certificate is the registry's
    rootcertbundle and rides in each token's ``x5c`` header (distribution verifies the chain to it)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = workdir / "token.key", workdir / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-subj", "/CN=modelcache test token issuer", "-days", "2"],
                       check=True, capture_output=True, timeout=60)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True, timeout=30).stdout
        self.x5c = base64.b64encode(der).decode()
        self.port = free_port()
        self.issued: list[str] = []  # every token handed out, to look for in logs and rows
        self.asked: list[dict] = []  # each request's query and whether its credentials were right
        self.first_lifetime = 300  # seconds the first token lasts (distribution allows 60 more: its Leeway)
        self.dribble = False  # answer one byte a second, forever: a realm that never finishes its answer
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self.token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        right = request.headers.get("Authorization") == expected
        self.asked.append({**request.query, "right": right})
        if self.dribble:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"token": "')
            while True:  # each byte well within downloads.read_timeout
                await asyncio.sleep(1)
                await response.write(b"x")
        if not right:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        scope = request.query.get("scope", "")
        access = []
        if scope.startswith("repository:"):
            _, name, actions = scope.split(":")
            access = [{"type": "repository", "name": name, "actions": actions.split(",")}]
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": USER, "aud": request.query.get("service"), "exp": now + (300 if self.issued else self.first_lifetime),
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        proc = await asyncio.create_subprocess_exec("openssl", "dgst", "-sha256", "-sign", str(self.key),
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        signature, _ = await proc.communicate(signing_input.encode())
        assert proc.returncode == 0
        jwt = f"{signing_input}.{b64url(signature)}"
        self.issued.append(jwt)
        return web.json_response({"token": jwt, "expires_in": 300})


@pytest.fixture
async def token_registry(tmp_path):
    """The pushed Ollama model, in a registry that wants tokens from a TokenServer."""
    if REGISTRY is None or SKOPEO is None:
        pytest.skip("Debian's docker-registry and skopeo are needed (apt-get install docker-registry skopeo)")
    plain = await asyncio.to_thread(Registry, tmp_path / "plain")
    try:
        manifest, blobs = await asyncio.to_thread(push_ollama_model, plain, tmp_path)
    finally:
        await asyncio.to_thread(plain.stop)
    tokens = TokenServer(tmp_path / "tokens")
    await tokens.start()
    auth = (f"auth:\n  token:\n    realm: {tokens.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {tokens.cert}\n")
    # the same storage, now served by a registry that wants tokens
    server = await asyncio.to_thread(Registry, tmp_path / "authed", tmp_path / "plain" / "storage", auth)
    yield server, tokens, manifest, blobs
    await asyncio.to_thread(server.stop)
    await tokens.stop()


def source_settings(tmp_path: Path, dsn: str, registry_port: int, username: str | None = USER) -> config.Settings:
    lines = ["[sources.registry]", 'kind = "ollama"', f'url = "http://127.0.0.1:{registry_port}"',
             f'token_env = "{PASSWORD_ENV}"']
    if username:
        lines.append(f'username = "{username}"')
    lines += ["", "[downloads]", "poll_seconds = 0.2", "read_timeout = 5", "retries = 0"]
    path = tmp_path / "modelcache.toml"
    path.write_text("\n".join(lines) + "\n")
    return config.load(path, env={}, overrides={"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn})


@pytest.fixture
def serving(token_registry, start_server, worker, db, make_token):
    """A server and a download worker for ``settings``, the registry source allowed (with ``realm``, its
    token realm's URL prefix too); returns (server, an admin token)."""
    async def start(settings: config.Settings, realm: bool = True) -> tuple:
        server = await start_server(settings)
        await worker(settings)
        tokens = token_registry[1]
        await allow(db, "registry", *([f"http://127.0.0.1:{tokens.port}/"] if realm else []))
        return server, await make_token("admin")

    return start


def download_row(dsn: str, download_id: str) -> str:
    """Every column of the download's row, as text."""
    with psycopg.connect(dsn) as conn:
        return str(conn.execute("SELECT to_jsonb(d)::text FROM model_downloads d WHERE id = %s",
                                (download_id,)).fetchone())


async def test_a_registry_behind_token_auth_is_downloaded_with_a_token_from_its_realm(
        token_registry, tmp_path, serving, db, dsn, http, make_token, monkeypatch, caplog):
    registry, tokens, manifest, blobs = token_registry
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    # the registry wants a token: a plain GET is challenged with the realm, service and scope
    async with http.get(f"http://127.0.0.1:{registry.port}/v2/library/tiny/manifests/1",
                        headers={"Accept": DOCKER}) as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{tokens.realm}",service="{SERVICE}"'), challenge
    assert 'scope="repository:library/tiny:pull"' in challenge

    settings = source_settings(tmp_path, dsn, registry.port)
    # the realm is another origin on loopback: refused by the hop policy until a URL prefix allows it
    server, admin = await serving(settings, realm=False)
    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    assert job["state"] == "failed", job
    assert "token_realm" in job["error"] and f"127.0.0.1:{tokens.port}/token" in job["error"], job["error"]
    assert tokens.asked == []  # the credentials never left

    await allow(db, "registry", f"http://127.0.0.1:{tokens.port}/")
    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="2")
    await assert_pulled_as_ollama(job, manifest, blobs, http, server, await make_token("node"), dsn, settings)
    assert tokens.asked and all(a["right"] for a in tokens.asked)
    assert {(a["service"], a["scope"]) for a in tokens.asked} == {(SERVICE, "repository:library/tiny:pull")}

    # neither the tokens nor the password are in our logs or the download rows
    assert tokens.issued
    secrets = [*tokens.issued, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    logged = caplog.text
    assert "a token for repository:library/tiny:pull from the realm" in logged
    for secret in secrets:
        assert secret not in logged
        for part in secret.split("."):  # nor a piece of a JWT (its header, claims or signature)
            if len(part) > 40:
                assert part not in logged
    with psycopg.connect(dsn) as conn:
        rows = str(conn.execute("SELECT to_jsonb(d)::text FROM model_downloads d").fetchall())
        audit = str(conn.execute("SELECT to_jsonb(a)::text FROM model_audit_log a").fetchall())
    for secret in secrets:
        assert secret not in rows and secret not in audit


async def test_a_wrong_registry_password_fails_the_download_naming_the_realms_answer(
        token_registry, tmp_path, serving, dsn, http, make_token, monkeypatch, caplog):
    registry, tokens, manifest, _ = token_registry
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password-42")
    settings = source_settings(tmp_path, dsn, registry.port)
    server, admin = await serving(settings)

    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    assert job["state"] == "failed", job
    error = job["error"]
    assert "token realm refused to give a token as alice (sources.registry)" in error, error
    assert f"http://127.0.0.1:{tokens.port}/token answered 401 Unauthorized" in error, error
    assert tokens.asked and not any(a["right"] for a in tokens.asked)
    assert tokens.issued == []
    assert "not-the-password-42" not in caplog.text and "not-the-password-42" not in download_row(dsn, job["id"])
    assert staging_left(settings.data_dir) == []


def test_a_username_needs_a_password_and_an_ollama_source(tmp_path):
    def load(table: str) -> config.Settings:
        path = tmp_path / "c.toml"
        path.write_text(table)
        return config.load(path, env={}, overrides={"storage.data_dir": str(tmp_path / "data")})

    with pytest.raises(config.ConfigError, match="needs token_env or token_file"):
        load('[sources.r]\nkind = "ollama"\nurl = "https://registry.example"\nusername = "alice"\n')
    with pytest.raises(config.ConfigError, match="only an ollama source takes one"):
        load('[sources.r]\nkind = "http"\nurl = "https://x.example"\ntoken_env = "T"\nusername = "alice"\n')
    ok = load('[sources.r]\nkind = "ollama"\nurl = "https://registry.example"\ntoken_env = "T"\nusername = "alice"\n')
    assert ok.sources["r"].username == "alice"


async def test_a_token_that_expires_mid_download_is_asked_for_again(
        token_registry, tmp_path, serving, dsn, http, make_token, monkeypatch):
    """Docker Hub's tokens last five minutes, a layer may take hours: a 401 later in the download (the
    next file, a part, a resume) asks the realm again instead of failing the download."""
    registry, tokens, manifest, blobs = token_registry
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    tokens.first_lifetime = 2 - 60  # distribution accepts it for 60 s past its exp: two seconds from now
    settings = source_settings(tmp_path, dsn, registry.port)
    # 4 KiB/s: the model layer (16 KiB) takes about four seconds, so the files after it outlive the token
    settings = config.load(tmp_path / "modelcache.toml", env={}, overrides={
        "storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn, "downloads.max_bytes_per_second": 4096})
    server, admin = await serving(settings)
    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    assert job["state"] == "completed", job
    assert job["digest"] == sha256(manifest)
    assert len(tokens.issued) >= 2, tokens.asked  # the first expired; the registry's 401 got a second


async def test_a_realm_that_never_finishes_its_answer_fails_the_download_in_bounded_time(
        token_registry, tmp_path, serving, dsn, http, make_token, monkeypatch):
    """A byte a second keeps every read within downloads.read_timeout (5 s here): the token answer, at most
    1 MiB, must still arrive whole within that time, not hold the download (and its source's slot) forever."""
    registry, tokens, _, _ = token_registry
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    tokens.dribble = True
    settings = source_settings(tmp_path, dsn, registry.port)
    server, admin = await serving(settings)
    started = time.monotonic()
    job = await download(http, server, admin, source="registry", reference="tiny:1", model="tiny", version="1")
    assert job["state"] == "failed", job
    assert time.monotonic() - started < 20
    assert "its token realm" in job["error"] and "did not finish its answer within 5s" in job["error"], job["error"]


@pytest.mark.parametrize("rest, expected", [
    ('realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull"',
     {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/x:pull"}),
    # unquoted values (a token per RFC 9110), spaces after commas, names in any case
    ("Realm=https://ghcr.io/token, service=ghcr.io ,scope=repository:a/b:pull",
     {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:a/b:pull"}),
    # a quoted string may hold commas and escaped quotes
    (r'realm="https://r/t?a=1,b=2",error="insufficient_scope",error_description="need \"pull\""',
     {"realm": "https://r/t?a=1,b=2", "error": "insufficient_scope", "error_description": 'need "pull"'}),
    ("", {}),
])
def test_challenge_parameters_quoted_or_not(rest, expected):
    assert challenge_params(rest) == expected
