"""Downloads from real upstream servers on loopback: Debian's nginx, and a TCP proxy that cuts connections.

Never a mock of our own client: nginx serves real files with real ETags and
ranges; the proxy is a real TCP server between us and nginx that drops a
response after N bytes (and may change the file meanwhile); the crash test
kills a real ``modelcache run`` and starts it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import gguf_bytes, run_cli
from modelcache import config, preferences
from modelcache.auth import Subject
from modelcache.downloads.worker import DownloadWorker
from modelcache.errors import ConfigError
from modelcache.server.keys import CATALOG

pytestmark = pytest.mark.registry

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed (apt-get install nginx)")
ENDED = ("completed", "failed", "rejected", "cancelled")
SECRET = "mc-upstream-secret-4f2a9c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_conf(workdir: Path, servers: str) -> str:
    """A whole nginx config around ``servers``: no daemon, its files in ``workdir``, an access log of
    status, bytes, Range and If-Range per request (what the tests read back)."""
    user = "user root root;" if os.geteuid() == 0 else ""
    temps = "\n".join(f"{name}_temp_path {workdir}/{name};" for name in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format bytes '$status $body_bytes_sent "$http_range" "$http_if_range" $uri';
  access_log {workdir}/access.log bytes;
  {temps}
  default_type application/octet-stream;
{servers}
}}
"""


class Nginx:
    """nginx serving ``root`` on a free 127.0.0.1 port; its access log records status, bytes and ranges."""

    def __init__(self, root: Path, workdir: Path, rate: str = "8m", tls: tuple[Path, Path] | None = None) -> None:
        self.root, self.workdir, self.port = root, workdir, free_port()
        self.proxy_port, self.tls_port = free_port(), free_port()
        self.log, self.proxy_log = workdir / "access.log", workdir / "proxy.log"
        tls_server = f"""
  server {{
    listen 127.0.0.1:{self.tls_port} ssl;
    ssl_certificate {tls[0]};
    ssl_certificate_key {tls[1]};
    root {root};
  }}""" if tls else ""
        self.start(f"""
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    location /slow/ {{ alias {root}/; limit_rate {rate}; }}
    location /slower/ {{ alias {root}/; limit_rate 1m; }}
    location /private/ {{
      alias {root}/;
      if ($http_authorization != "Bearer {SECRET}") {{ return 401; }}
    }}
    location = /redirect/metadata {{ return 302 http://169.254.169.254/latest/meta-data/; }}
    location = /redirect/other-host {{ return 302 http://localhost:{self.port}/files/model.gguf; }}
    location = /redirect/same {{ return 302 /files/model.gguf; }}
  }}
  server {{
    # a forward proxy for plain http (absolute request URIs), as HTTP_PROXY names one
    listen 127.0.0.1:{self.proxy_port};
    access_log {self.proxy_log} bytes;
    location / {{ proxy_pass http://127.0.0.1:{self.port}; }}
  }}{tls_server}""")

    def start(self, servers: str) -> None:
        workdir = self.workdir
        (workdir / "nginx.conf").write_text(nginx_conf(workdir, servers))
        with open(workdir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, f"nginx exited: {(workdir / 'stderr.log').read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 10s"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def entries(self, log: Path | None = None) -> list[dict]:
        """The access log: one dict per request (status, bytes, range, if_range, uri)."""
        out = []
        log = log or self.log
        for line in (log.read_text() if log.exists() else "").splitlines():
            status, sent, rng, if_range, uri = line.split(" ", 4)
            out.append({"status": int(status), "bytes": int(sent), "range": rng.strip('"'),
                        "if_range": if_range.strip('"'), "uri": uri})
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def nginx_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(the served root, with its files/ folder; nginx's work dir), readable by nginx's worker; or a skip."""
    if NGINX is None:
        pytest.skip("Debian's nginx is not installed (apt-get install nginx)")
    root, work = tmp_path / "www", tmp_path / "nginx"
    (root / "files").mkdir(parents=True)
    work.mkdir()
    os.chmod(tmp_path, 0o755)
    return root, work


@pytest.fixture
def nginx(tmp_path):
    root, work = nginx_dirs(tmp_path)
    tls = make_tls(work) if shutil.which("openssl") else None
    server = Nginx(root, work, tls=tls)
    server.ca = work / "ca.pem" if tls else None
    yield server
    server.stop()


def make_tls(work: Path) -> tuple[Path, Path]:
    """A throwaway CA (ca.pem) and a certificate it signed for 127.0.0.1, with openssl."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "srv.pem", "-days", "2", "-extfile", "san.ext")
    return work / "srv.pem", work / "srv.key"


def put(nginx: Nginx, name: str, content: bytes) -> str:
    """Serve ``content`` as files/<name>; returns its digest."""
    path = nginx.root / "files" / name
    tmp = path.with_suffix(".new")
    tmp.write_bytes(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return "sha256:" + hashlib.sha256(content).hexdigest()


class LoopbackProxy:
    """A real TCP proxy on 127.0.0.1 in front of an upstream port; subclasses decide what each connection
    gets (``_serve(n, reader, writer)``, ``n`` counting connections from 0)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.connections = upstream_port, 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def _handle(self, reader, writer) -> None:
        n = self.connections
        self.connections += 1
        await self._serve(n, reader, writer)

    async def stop(self) -> None:
        self.server.close()


class CuttingProxy(LoopbackProxy):
    """The first ``cuts`` responses end after ``after`` bytes, with a reset."""

    def __init__(self, upstream_port: int, after: int, cuts: int = 1, on_cut=None) -> None:
        super().__init__(upstream_port)
        self.after, self.cuts, self.on_cut = after, cuts, on_cut

    async def _serve(self, n: int, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()  # the client hung up: so does nginx, and this handler ends with the test

        forward = asyncio.create_task(upstream())
        sent = 0
        try:
            while data := await up_reader.read(65536):
                if n < self.cuts and sent + len(data) >= self.after:
                    writer.write(data[:self.after - sent])
                    await writer.drain()
                    if self.on_cut:
                        self.on_cut()
                    writer.transport.abort()  # a reset, mid-body
                    return
                writer.write(data)
                await writer.drain()
                sent += len(data)
        except ConnectionError:
            pass
        finally:
            forward.cancel()
            up_writer.close()
            writer.close()


@pytest.fixture
def make_download_settings(tmp_path, dsn):
    """Settings with ``[sources.<id>]`` tables (written to a real config file): a source is its URL (an
    ``http`` source) or ``(kind, url)``."""

    def make(sources: dict[str, str | tuple[str, str]], tokens: dict[str, str] | None = None,
             **overrides) -> config.Settings:
        lines = []
        for sid, source in sources.items():
            kind, url = ("http", source) if isinstance(source, str) else source
            lines += [f"[sources.{sid}]", f'kind = "{kind}"', f'url = "{url}"']
            if tokens and sid in tokens:
                lines.append(f'token_env = "{tokens[sid]}"')
            lines.append("")
        lines += ["[downloads]", "poll_seconds = 0.2", "read_timeout = 5"]
        path = tmp_path / "modelcache.toml"
        path.write_text("\n".join(lines) + "\n")
        values = {"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn, **overrides}
        return config.load(path, env={}, overrides=values)

    return make


async def allow(db, *sources: str, approval: bool = False) -> None:
    await preferences.set_preference(db, "models.download.allowed_sources", list(sources), Subject.local())
    await preferences.set_preference(db, "models.download.require_user_approval", approval, Subject.local())


@pytest.fixture
async def worker(db, store):
    started = []

    async def start(settings: config.Settings) -> DownloadWorker:
        w = DownloadWorker(settings, db, store)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


async def request_download(http, server, token, **body) -> dict:
    async with http.post(server.make_url("/v1/downloads"), json=body, headers=bearer(token)) as r:
        answer = await r.json()
        assert r.status == 202, answer
        return answer


async def wait_for(http, server, token, download_id, states=ENDED, timeout=30, until=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(server.make_url(f"/v1/downloads/{download_id}"), headers=bearer(token)) as r:
            body = await r.json()
        if body["state"] in states or (until and until(body)):
            return body
        assert time.monotonic() < deadline, f"download still {body['state']} after {timeout}s: {body}"
        await asyncio.sleep(0.1)


def audit_rows(dsn: str, action: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT decision, outcome, reason, details FROM model_audit_log WHERE action = %s "
                            "ORDER BY created_at", (action,)).fetchall()


def held_blobs(dsn: str, data_dir: Path) -> list[Path]:
    """The blob files the registry lists."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT DISTINCT blob_digest FROM artifact_files").fetchall()
    return sorted(data_dir / "blobs" / "sha256" / d[7:9] / d[7:] for (d,) in rows)


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file())


# -- configuration ----------------------------------------------------------------


def test_sources_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[sources.mirror]\nkind = "http"\nurl = "https://models.example/pub"\ntoken_env = "MIRROR_TOKEN"\n')
    settings = config.load(path, env={})
    assert settings.sources["mirror"].url == "https://models.example/pub/"
    assert settings.sources["mirror"].token_env == "MIRROR_TOKEN"
    path.write_text('[sources.hub]\nkind = "huggingface"\nurl = "https://huggingface.co"\n')
    assert config.load(path, env={}).sources["hub"].kind == "huggingface"
    path.write_text('[sources.hub]\nkind = "ftp"\nurl = "https://huggingface.co"\n')
    with pytest.raises(ConfigError, match=r"sources\.hub\.kind = 'ftp'.*expected one of http, huggingface"):
        config.load(path, env={})
    path.write_text('[sources.x]\nkind = "http"\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError, match=r"sources\.x\.url = 'ftp://x'"):
        config.load(path, env={})
    path.write_text('[sources.x]\nkind = "http"\nurl = "https://x/"\ntoken_env = "A"\ntoken_file = "/a"\n')
    with pytest.raises(ConfigError, match=r"sources\.x .*token_env or token_file, not both"):
        config.load(path, env={})
    path.write_text('[sources.x]\nkind = "http"\nurl = "https://x/"\npassword = "hunter2"\n')
    with pytest.raises(ConfigError, match=r"unknown key sources\.x\.password"):
        config.load(path, env={})


# -- requests, approval, policy ---------------------------------------------------


@needs_nginx
async def test_approval_flow_then_transfer_registers_and_serves(
        nginx, make_download_settings, start_server, worker, db, dsn, http, make_token):
    content = gguf_bytes(n_floats=64 * 1024)
    digest = put(nginx, "model.gguf", content)
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "local", approval=True)
    server = await start_server(settings)
    await worker(settings)
    operator, admin, other_admin = await make_token("operator", "op"), await make_token("admin", "boss"), \
        await make_token("admin", "boss2")

    asked = await request_download(http, server, operator, source="local", reference="files/model.gguf",
                                   model="tiny", version="1", sha256=digest)
    assert asked["state"] == "pending_approval" and asked["requested_by"] == "token:op"
    # the requester may not approve their own, whatever their role
    own = await request_download(http, server, admin, source="local", reference="files/model.gguf",
                                 model="tiny", version="2")
    async with http.post(server.make_url(f"/v1/downloads/{own['id']}/approve"), headers=bearer(admin)) as r:
        assert r.status == 403 and r.content_type == "application/problem+json"
        assert "may not approve" in (await r.json())["detail"]
    async with http.post(server.make_url(f"/v1/downloads/{asked['id']}/approve"), headers=bearer(operator)) as r:
        assert r.status == 403  # operators may not approve at all
    async with http.post(server.make_url(f"/v1/downloads/{asked['id']}/approve"), headers=bearer(admin)) as r:
        assert r.status == 200 and (await r.json())["approved_by"] == "token:boss"

    done = await wait_for(http, server, admin, asked["id"])
    assert done["state"] == "completed", done
    assert done["digest"] == digest and done["bytes_done"] == done["bytes_total"] == len(content)
    assert done["started_at"] and done["finished_at"] and done["artifact_id"]
    await server.app[CATALOG].reload()
    async with http.get(server.make_url(f"/v1/blobs/{digest}"), headers=bearer(admin)) as r:
        assert r.status == 200 and await r.read() == content
    # reject with a reason; a rejected request cannot be approved afterwards
    async with http.post(server.make_url(f"/v1/downloads/{own['id']}/reject"), json={"reason": "not needed"},
                         headers=bearer(other_admin)) as r:
        body = await r.json()
        assert r.status == 200 and body["state"] == "rejected" and body["reason"] == "not needed"
    async with http.post(server.make_url(f"/v1/downloads/{own['id']}/approve"), headers=bearer(other_admin)) as r:
        assert r.status == 409
    # the list filters and pages
    async with http.get(server.make_url("/v1/downloads"), params={"state": "completed"}, headers=bearer(admin)) as r:
        assert [d["id"] for d in (await r.json())["downloads"]] == [asked["id"]]
    async with http.get(server.make_url("/v1/downloads"), params={"limit": "1"}, headers=bearer(admin)) as r:
        first = await r.json()
    async with http.get(server.make_url("/v1/downloads"), params={"limit": "1", "cursor": first["next_cursor"]},
                        headers=bearer(admin)) as r:
        second = await r.json()
    assert {first["downloads"][0]["id"], second["downloads"][0]["id"]} == {asked["id"], own["id"]}
    # audited: requested, approved (and the refused self-approval), started, completed, rejected
    assert [r[0] for r in audit_rows(dsn, "model_download.approve")] == ["deny", "deny", "allow"]
    complete = audit_rows(dsn, "model_download.complete")
    assert complete[0][3]["digest"] == digest and complete[0][3]["bytes"] == len(content)
    assert audit_rows(dsn, "model_download.start") and audit_rows(dsn, "model_download.reject")[0][2] == "not needed"
    async with http.get(server.make_url("/metrics")) as r:
        metrics = await r.text()
    assert 'modelcache_downloads{state="completed"} 1.0' in metrics
    assert 'modelcache_downloads{state="rejected"} 1.0' in metrics
    assert f"modelcache_download_bytes {float(len(content))}" in metrics


@needs_nginx
async def test_a_source_not_allowed_is_refused_and_audited(nginx, make_download_settings, start_server, db, dsn,
                                                           http, make_token):
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "elsewhere")
    server = await start_server(settings)
    token = await make_token("operator")
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(token), json={
            "source": "local", "reference": "files/model.gguf", "model": "tiny", "version": "1"}) as r:
        body = await r.json()
    assert r.status == 403 and r.content_type == "application/problem+json"
    assert "models.download.allowed_sources" in body["detail"]
    [(decision, outcome, reason, _)] = audit_rows(dsn, "model_download.request")
    assert decision == "deny" and "models.download.allowed_sources" in reason
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(token), json={
            "source": "nowhere", "reference": "x.gguf", "model": "tiny", "version": "1"}) as r:
        assert r.status == 404 and "no source 'nowhere'" in (await r.json())["detail"]
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(token), json={
            "source": "local", "reference": "../etc/passwd", "model": "tiny", "version": "1"}) as r:
        assert r.status == 400 and "invalid reference" in (await r.json())["detail"]


@needs_nginx
async def test_redirects_are_checked_hop_by_hop(nginx, make_download_settings, start_server, worker, db, dsn, http,
                                                make_token):
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=1024))
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "local")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    ids = {}
    for case in ("metadata", "other-host", "same"):
        asked = await request_download(http, server, token, source="local", reference=f"redirect/{case}",
                                       model="tiny", version=case, artifact_type="gguf")
        ids[case] = asked["id"]
    results = {case: await wait_for(http, server, token, i) for case, i in ids.items()}
    assert results["same"]["state"] == "completed" and results["same"]["digest"] == digest
    for case in ("metadata", "other-host"):
        assert results[case]["state"] == "failed"
        assert "download policy internal_address" in results[case]["error"]
    assert "169.254.169.254" in results["metadata"]["error"] and "localhost" in results["other-host"]["error"]
    reasons = [r[2] for r in audit_rows(dsn, "model_download.fail")]
    assert len(reasons) == 2 and all("internal_address" in r for r in reasons)
    # nothing was requested from the refused hops: nginx saw only the redirects and the one good file
    assert sorted(e["uri"] for e in nginx.entries()) == sorted(
        ["/redirect/metadata", "/redirect/other-host", "/redirect/same", "/files/model.gguf"])


@needs_nginx
async def test_a_lying_source_keeps_nothing(nginx, make_download_settings, start_server, worker, db, store, http,
                                            make_token):
    put(nginx, "model.gguf", gguf_bytes(n_floats=4096))
    claimed = "sha256:" + "0" * 64
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "local")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="local", reference="files/model.gguf",
                                   model="tiny", version="1", sha256=claimed)
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "failed" and f"expected {claimed}" in done["error"]
    assert blob_files(store.root) == [] and list(store.downloads_dir.iterdir()) == []
    async with http.get(server.make_url("/v1/artifacts"), headers=bearer(token)) as r:
        assert (await r.json())["artifacts"] == []


@needs_nginx
async def test_the_cache_size_limit_applies_before_the_transfer(nginx, make_download_settings, start_server, worker,
                                                                db, store, http, make_token, make_file,
                                                                make_artifact):
    content = gguf_bytes(n_floats=2 << 20)  # 8 MiB
    put(nginx, "model.gguf", content)
    settings = make_download_settings({"local": nginx.url + "slower/"})  # 1 MiB/s: what was sent is what was read
    await allow(db, "local")
    await preferences.set_preference(db, "models.cache.evict_policy", "none", Subject.local())
    await preferences.set_preference(db, "models.cache.max_bytes", 1 << 20, Subject.local())
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="local", reference="files/model.gguf",
                                   model="tiny", version="1")
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "failed" and "do not fit" in done["error"], done
    assert blob_files(store.root) == []
    # refused on the headers, before the body was read
    [entry] = nginx.entries()
    assert entry["bytes"] < len(content) // 4
    # a cache already over its limit takes no request at all: 507 problem+json
    await make_artifact(make_file(size=512 << 10, gguf=True))
    await preferences.set_preference(db, "models.cache.max_bytes", 100 << 10, Subject.local())
    async with http.post(server.make_url("/v1/downloads"), headers=bearer(token), json={
            "source": "local", "reference": "files/model.gguf", "model": "tiny", "version": "2"}) as r:
        assert r.status == 507 and r.content_type == "application/problem+json"
        assert "models.cache.max_bytes" in (await r.json())["detail"]


@needs_nginx
async def test_https_with_the_configured_ca_bundle(nginx, make_download_settings, start_server, worker, db, http,
                                                  make_token):
    if nginx.ca is None:
        pytest.skip("openssl is not installed")
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=4096))
    tls_url = f"https://127.0.0.1:{nginx.tls_port}/"
    token = await make_token("operator")
    await allow(db, "tls")
    results = {}
    for name, bundle in (("without", None), ("with", str(nginx.ca))):
        settings = make_download_settings({"tls": tls_url}, **{"downloads.ca_bundle": bundle})
        server = await start_server(settings)
        w = await worker(settings)
        asked = await request_download(http, server, token, source="tls", reference="files/model.gguf",
                                       model="tiny", version=name)
        results[name] = await wait_for(http, server, token, asked["id"])
        await w.stop()
    assert results["without"]["state"] == "failed" and "certificate" in results["without"]["error"].lower()
    assert results["with"]["state"] == "completed" and results["with"]["digest"] == digest


@needs_nginx
async def test_http_proxy_and_no_proxy_from_the_environment(nginx, make_download_settings, start_server, worker, db,
                                                            http, make_token, monkeypatch):
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=4096))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{nginx.proxy_port}")
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "local")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="local", reference="files/model.gguf",
                                   model="tiny", version="1")
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "completed" and done["digest"] == digest, done
    assert [e["uri"] for e in nginx.entries(nginx.proxy_log)] == ["/files/model.gguf"]  # through the proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    asked = await request_download(http, server, token, source="local", reference="files/model.gguf",
                                   model="tiny", version="1")  # the same artifact again: a no-op registration
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "completed", done
    # the second went direct: the file server saw it (twice in all), the proxy did not
    assert len(nginx.entries(nginx.proxy_log)) == 1 and len(nginx.entries()) == 2


@needs_nginx
async def test_a_source_token_comes_from_the_environment_and_is_never_stored_or_logged(
        nginx, make_download_settings, start_server, worker, db, dsn, http, make_token, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=4096))
    monkeypatch.setenv("MC_TEST_UPSTREAM_TOKEN", SECRET)
    settings = make_download_settings({"private": nginx.url + "private/", "anonymous": nginx.url + "private/"},
                                      tokens={"private": "MC_TEST_UPSTREAM_TOKEN"})
    await allow(db, "private", "anonymous")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    results = {}
    for source in ("anonymous", "private"):
        asked = await request_download(http, server, token, source=source, reference="files/model.gguf",
                                       model="tiny", version="1")
        results[source] = await wait_for(http, server, token, asked["id"])
    assert results["anonymous"]["state"] == "failed" and "401" in results["anonymous"]["error"]
    assert results["private"]["state"] == "completed" and results["private"]["digest"] == digest
    assert "download" in caplog.text and SECRET not in caplog.text
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT (SELECT string_agg(d::text, ' ') FROM model_downloads d) || "
                              "(SELECT string_agg(a::text, ' ') FROM model_audit_log a)").fetchone()[0]
    assert SECRET not in stored and "private" in stored
    monkeypatch.delenv("MC_TEST_UPSTREAM_TOKEN")
    asked = await request_download(http, server, token, source="private", reference="files/model.gguf",
                                   model="tiny", version="1")
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "failed" and "sources.private.token_env names MC_TEST_UPSTREAM_TOKEN" in done["error"]


# -- transfer: drops, changes, cancel ---------------------------------------------


@needs_nginx
async def test_a_dropped_connection_resumes_with_range_and_if_range(
        nginx, make_download_settings, start_server, worker, db, http, make_token):
    content = gguf_bytes(n_floats=1 << 20)  # 4 MiB
    digest = put(nginx, "model.gguf", content)
    proxy = CuttingProxy(nginx.port, after=1_500_000)
    url = await proxy.start()
    settings = make_download_settings({"cut": url})
    await allow(db, "cut")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="cut", reference="files/model.gguf", model="tiny",
                                   version="1")
    done = await wait_for(http, server, token, asked["id"])
    await proxy.stop()
    assert done["state"] == "completed", done
    assert done["digest"] == digest and done["artifact_id"]
    first, second = nginx.entries()
    assert first["status"] == 200 and first["range"] == "-"
    assert second["status"] == 206 and second["range"].startswith("bytes=") and second["if_range"] != "-"
    resumed_from = int(second["range"][6:-1])
    assert 1_000_000 < resumed_from < 1_500_000
    assert resumed_from + second["bytes"] == len(content)


@needs_nginx
async def test_a_file_changed_between_attempts_starts_over(nginx, make_download_settings, start_server, worker, db,
                                                          http, make_token):
    put(nginx, "model.gguf", gguf_bytes(n_floats=1 << 20))
    new = gguf_bytes(n_floats=(1 << 20) + 1024)  # another size: nginx's ETag changes even within one second
    proxy = CuttingProxy(nginx.port, after=1_000_000, on_cut=lambda: put(nginx, "model.gguf", new))
    url = await proxy.start()
    settings = make_download_settings({"cut": url})
    await allow(db, "cut")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="cut", reference="files/model.gguf", model="tiny",
                                   version="1")
    done = await wait_for(http, server, token, asked["id"])
    await proxy.stop()
    assert done["state"] == "completed", done
    assert done["digest"] == "sha256:" + hashlib.sha256(new).hexdigest()  # never a splice of two versions
    entries = nginx.entries()
    assert entries[0]["status"] == 200
    assert entries[1]["if_range"] != "-" and entries[1]["status"] == 200  # If-Range no longer matched
    assert entries[-1]["status"] == 200 and entries[-1]["range"] == "-"


@needs_nginx
async def test_cancel_a_running_download(nginx, make_download_settings, start_server, worker, db, store, http,
                                         make_token):
    put(nginx, "model.gguf", gguf_bytes(n_floats=2 << 20))  # 8 MiB at 1 MiB/s
    settings = make_download_settings({"slow": nginx.url + "slower/"})
    await allow(db, "slow")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="slow", reference="files/model.gguf", model="tiny",
                                   version="1")
    running = await wait_for(http, server, token, asked["id"], until=lambda b: b["rate_bytes_per_second"])
    assert running["state"] == "running" and 0 < running["bytes_done"] < running["bytes_total"]
    assert 0 < running["eta_seconds"] < 60 and running["rate_bytes_per_second"] < 4 << 20
    async with http.post(server.make_url(f"/v1/downloads/{asked['id']}/cancel"), headers=bearer(token)) as r:
        assert r.status == 200 and (await r.json())["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while list(store.downloads_dir.iterdir()):
        assert time.monotonic() < deadline, list(store.downloads_dir.iterdir())
        await asyncio.sleep(0.1)
    assert blob_files(store.root) == []
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "cancelled" and done["decided_by"].startswith("token:")


class Killable:
    """A real modelcache subprocess (``self.proc``) a test kills, or stops as SIGTERM would."""

    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


class RunProcess(Killable):
    """A real ``modelcache run`` subprocess (on ``dsn``, with ``conf``) that a test kills and starts again;
    its log is ``tmp_path/run.log``."""

    def __init__(self, tmp_path: Path, conf: Path, dsn: str, data: Path, port: int, http, token: str,
                 env: dict[str, str]) -> None:
        self.args = [sys.executable, "-m", "modelcache", "run", "--config", str(conf), "--dsn", dsn,
                     "--data-dir", str(data)]
        self.log_path, self.env, self.http, self.token = tmp_path / "run.log", env, http, token
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        """Start it and wait until /readyz answers 200 (30 s at most)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                async with self.http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log_path.read_text()
            await asyncio.sleep(0.1)

    async def download(self, download_id: str) -> dict:
        async with self.http.get(f"{self.base}/v1/downloads/{download_id}", headers=bearer(self.token)) as r:
            return await r.json()

    async def until_ended(self, download_id: str, timeout: float) -> dict:
        """The download once it has ended (completed, failed, rejected or cancelled)."""
        deadline = time.monotonic() + timeout
        while (body := await self.download(download_id))["state"] not in ENDED:
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        return body


# -- a killed process resumes from disk ---------------------------------------------


@needs_nginx
async def test_killing_run_mid_download_resumes_from_disk(nginx, tmp_path, dsn, db, make_token, http):
    content = gguf_bytes(n_floats=6 << 20)  # 24 MiB at 8 MiB/s: about 3 s
    digest = put(nginx, "model.gguf", content)
    await allow(db, "slow")
    token = await make_token("operator")
    port = free_port()
    conf = tmp_path / "run.toml"
    conf.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[sources.slow]\nkind = "http"\n'
                    f'url = "{nginx.url}slow/"\n\n[downloads]\npoll_seconds = 0.2\n')
    data = tmp_path / "run-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    run = RunProcess(tmp_path, conf, dsn, data, port, http, token, env)
    try:
        await run.start()
        async with http.post(f"{run.base}/v1/downloads", headers=bearer(token), json={
                "source": "slow", "reference": "files/model.gguf", "model": "tiny", "version": "1",
                "sha256": digest}) as r:
            assert r.status == 202
            asked = await r.json()
        deadline = time.monotonic() + 20
        while (body := await run.download(asked["id"]))["bytes_done"] < len(content) // 4:
            assert body["state"] in ("queued", "running") and time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
        run.kill()
        partial = data / "tmp" / "downloads" / f"{asked['id']}.partial"
        on_disk = partial.stat().st_size
        assert on_disk >= len(content) // 4

        await run.start()
        body = await run.until_ended(asked["id"], timeout=30)
    finally:
        run.stop()
    assert body["state"] == "completed" and body["digest"] == digest, body
    assert body["attempts"] == 2
    # one blob of the content (and those derived from it for /v2), every one the registry's; nothing half-written
    held = held_blobs(dsn, data)
    assert data / "blobs" / "sha256" / digest[7:9] / digest[7:] in held
    assert blob_files(data) == held
    assert [p for p in (data / "tmp").rglob("*") if p.is_file()] == []
    assert not partial.exists()
    entries = [e for e in nginx.entries() if e["uri"].endswith("model.gguf")]
    assert entries[0]["status"] == 200 and entries[-1]["status"] == 206
    assert int(entries[-1]["range"][6:-1]) >= on_disk  # resumed from the bytes on disk, not from 0
    assert sum(e["bytes"] for e in entries) < 1.5 * len(content)
    assert "resumed" in (tmp_path / "run.log").read_text()


# -- the CLI -------------------------------------------------------------------------


@needs_nginx
async def test_cli_download_approve_reject_cancel(nginx, make_download_settings, start_server, worker, db,
                                                 make_token):
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=256 * 1024))
    settings = make_download_settings({"local": nginx.url})
    await allow(db, "local", approval=True)
    server = await start_server(settings)
    await worker(settings)
    url = str(server.make_url("")).rstrip("/")
    op = {"MODELCACHE_URL": url, "MODELCACHE_TOKEN": await make_token("operator", "op")}
    admin = {"MODELCACHE_URL": url, "MODELCACHE_TOKEN": await make_token("admin", "boss")}

    async def cli(env, *args):
        return await asyncio.to_thread(run_cli, *args, env=env)

    queued = await cli(op, "download", "local", "files/model.gguf", "--model", "tiny", "--version", "1",
                       "--no-wait")
    assert queued.returncode == 0, queued.stderr
    download_id = queued.stdout.strip().splitlines()[-1]
    waiting = asyncio.create_task(cli(op, "download", "local", "files/model.gguf", "--model", "tiny",
                                      "--version", "2", "--sha256", digest))
    listed = await cli(admin, "downloads", "--state", "pending_approval", "--json")
    assert download_id in listed.stdout
    rejected = await cli(admin, "reject", download_id, "--reason", "wrong file")
    assert rejected.returncode == 0 and "rejected" in rejected.stdout
    deadline = time.monotonic() + 20
    while True:
        pending = await cli(admin, "downloads", "--state", "pending_approval", "--json")
        import json as _json
        rows = _json.loads(pending.stdout)["downloads"]
        if rows:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    approved = await cli(admin, "approve", rows[0]["id"])
    assert approved.returncode == 0, approved.stderr
    done = await waiting
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == digest
    assert "waits for an admin's approval" in done.stderr
    again = await cli(admin, "cancel", download_id)
    assert again.returncode == 1 and "409" in again.stderr


# -- an http download with an expected sha256 is streamed while it is fetched ---------------


@needs_nginx
async def test_an_http_download_with_an_expected_sha256_is_streamed_while_it_is_fetched(
        nginx, make_download_settings, start_server, worker, db, http, make_token):
    """The expected sha256 and the upstream's Content-Length declare the file as a plan declares its
    files: a blob GET by that digest is answered at once and follows the partial file. Without an
    expected sha256 no client can name the blob before it is whole: its digest is not known yet."""
    content = gguf_bytes(n_floats=6 << 20)  # 24 MiB at 8 MiB/s: about 3 s
    digest = put(nginx, "model.gguf", content)
    other = gguf_bytes(n_floats=6 << 20)
    other_digest = put(nginx, "other.gguf", other)
    settings = make_download_settings({"slow": nginx.url + "slow/"})
    await allow(db, "slow")
    server = await start_server(settings)
    await worker(settings)
    operator, node = await make_token("operator"), await make_token("node")
    job = await request_download(http, server, operator, source="slow", reference="files/model.gguf",
                                 model="tiny", version="1", sha256=digest)
    unnamed = await request_download(http, server, operator, source="slow", reference="files/other.gguf",
                                     model="other", version="1")
    url = server.make_url(f"/v1/blobs/{digest}")
    deadline = time.monotonic() + 10
    while True:
        async with http.head(url, headers=bearer(node)) as r:
            if r.status == 200:
                assert r.content_length == len(content)
                break
        assert time.monotonic() < deadline, "the blob was not answered while it was fetched"
        await asyncio.sleep(0.05)
    asked = time.monotonic()
    async with http.get(url, headers=bearer(node)) as r:
        assert r.status == 200 and r.content_length == len(content)
        first = await r.content.readany()
        first_at = time.monotonic() - asked
        async with http.get(server.make_url(f"/v1/downloads/{job['id']}"), headers=bearer(operator)) as d:
            running = (await d.json())["state"]
        async with http.head(server.make_url(f"/v1/blobs/{other_digest}"), headers=bearer(node)) as o:
            unnamed_status = o.status
        body = first + await r.read()
    took = time.monotonic() - asked
    assert running == "running" and first_at < 1.0, (running, first_at)
    assert took >= 1.0, f"the whole body took {took:.2f}s: it was not fetched while streamed"
    assert body == content
    assert unnamed_status == 404  # the download without a sha256: nothing streams it by its digest
    done = await wait_for(http, server, operator, job["id"])
    assert done["state"] == "completed" and done["digest"] == digest
    assert (await wait_for(http, server, operator, unnamed["id"]))["digest"] == other_digest


async def test_a_start_removes_what_a_killed_announcer_left(settings, worker, store):
    """A process killed while it rewrote an announcement leaves its ``.tmp`` beside it; one killed at any
    time leaves the announcement itself. A worker's start removes both once stale (and the folder, when
    nothing else is in it), and leaves a live process's announcement alone."""
    folder = store.announcement_dir
    folder.mkdir(parents=True)
    old = time.time() - 60
    stale = folder / f"{'ab' * 32}.json"
    stale.write_text(json.dumps({"job": "j", "digest": f"sha256:{'ab' * 32}", "heartbeat": old}))
    half = folder / f"{'ab' * 32}.json.999999.tmp"
    half.write_text('{"job": ')
    os.utime(half, (old, old))
    live = folder / f"{'cd' * 32}.json"
    live.write_text(json.dumps({"job": "k", "digest": f"sha256:{'cd' * 32}", "heartbeat": time.time()}))
    fresh = folder / f"{'cd' * 32}.json.{os.getpid()}.tmp"  # being written right now
    fresh.write_text("{")
    w = await worker(settings)
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, fresh.name])
    await w.stop()
    live.unlink()
    fresh.unlink()
    stale.write_text(json.dumps({"job": "j", "digest": f"sha256:{'ab' * 32}", "heartbeat": old}))
    await worker(settings)
    assert not folder.exists()
