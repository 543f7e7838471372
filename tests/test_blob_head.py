"""The HEAD of a known blob answered as it is parsed (server/protocol.py), over raw loopback sockets.

What a client must not be able to tell: the answer is the one aiohttp's path gives, byte for byte
but the Date; requests on a connection are answered in order; every refusal is the error path's;
the keep-alive bound holds; the request is logged and counted.
"""

import asyncio
import logging

import pytest

from modelcache.server import protocol
from modelcache.server.keys import CATALOG

from conftest import gguf_bytes

pytestmark = [pytest.mark.registry, pytest.mark.e2e]


class Conn:
    """One raw HTTP connection: requests written as given, answers read one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server) -> "Conn":
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    async def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))
        await self.writer.drain()

    async def answer(self, head: bool) -> tuple[bytes, bytes]:
        """(status line and headers, body) of the next answer; a HEAD's answer has no body."""
        headers = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        length = 0
        for line in headers.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = b"" if head else await asyncio.wait_for(self.reader.readexactly(length), 5)
        return headers, body

    async def closed(self, within: float) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), within) == b""
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


def request(method: str, path: str, secret: str | None = None, *, version: str = "1.1", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if secret is not None:
        lines.append(f"Authorization: Bearer {secret}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def without_date(headers: bytes) -> bytes:
    return b"\r\n".join(line for line in headers.split(b"\r\n") if not line.startswith(b"Date: "))


@pytest.fixture
def early(monkeypatch) -> list[bytes]:
    """The answers protocol.py wrote itself (the rest went through aiohttp's request path)."""
    answered: list[bytes] = []
    blob_head = protocol.Connection._blob_head

    def spy(self, *args):
        answer = blob_head(self, *args)
        if answer is not None:
            answered.append(answer)
        return answer

    monkeypatch.setattr(protocol.Connection, "_blob_head", spy)
    return answered


@pytest.fixture
async def blob(make_file, make_artifact):
    content = gguf_bytes(n_floats=512)
    result = await make_artifact(make_file(content=content, name="m.gguf"))
    return content, result.digest


async def ready(server) -> Conn:
    """A keep-alive connection whose first request (always aiohttp's) is answered, so it is idle."""
    conn = await Conn.open(server)
    await conn.send(request("GET", "/healthz"))
    headers, _ = await conn.answer(head=False)
    assert headers.startswith(b"HTTP/1.1 200")
    return conn


@pytest.mark.parametrize("version,keep_alive", [("1.1", {}), ("1.0", {"Connection": "keep-alive"})])
async def test_answer_is_aiohttps_answer_byte_for_byte(server, blob, make_token, early, version, keep_alive):
    _, digest = blob
    secret = await make_token("reader")
    conn = await ready(server)
    path = f"/v1/blobs/{digest}"
    await conn.send(request("HEAD", path, secret, version=version, **keep_alive))
    fast, body = await conn.answer(head=True)
    assert len(early) == 1 and body == b""
    # a non-matching If-None-Match changes nothing in the answer but sends it through aiohttp
    await conn.send(request("HEAD", path, secret, version=version, If_None_Match='"other"', **keep_alive))
    slow, _ = await conn.answer(head=True)
    assert len(early) == 1
    assert without_date(fast) == without_date(slow)
    assert fast.startswith(f"HTTP/{version} 200 OK\r\n".encode())
    assert f"Docker-Content-Digest: {digest}\r\n".encode() in fast
    conn.close()


async def test_pipelined_requests_are_answered_in_order(server, blob, make_token, early):
    content, digest = blob
    secret = await make_token("reader")
    conn = await ready(server)
    path = f"/v1/blobs/{digest}"
    await conn.send(request("HEAD", path, secret), request("GET", path, secret), request("HEAD", path, secret),
                    request("HEAD", path, "mc_not_a_token"), request("HEAD", path, secret))
    statuses = []
    for head in (True, False, True, True, True):
        headers, body = await conn.answer(head)
        statuses.append(headers.split(b"\r\n")[0])
        if not head:
            assert body == content
    assert statuses == [b"HTTP/1.1 200 OK"] * 3 + [b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 200 OK"]
    assert len(early) == 1  # only the first: the rest queued behind the GET, which aiohttp answers
    conn.close()


async def test_an_upgrade_or_a_closing_head_is_aiohttps(server, blob, make_token, early):
    _, digest = blob
    secret = await make_token("reader")
    conn = await ready(server)
    await conn.send(request("HEAD", f"/v1/blobs/{digest}", secret, Connection="Upgrade", Upgrade="websocket"))
    headers, _ = await conn.answer(head=True)
    assert headers.startswith(b"HTTP/1.1 200"), headers
    await conn.send(request("HEAD", f"/v1/blobs/{digest}", secret, Connection="close"))
    headers, _ = await conn.answer(head=True)
    assert headers.startswith(b"HTTP/1.1 200") and b"Connection: close" in headers, headers
    assert await conn.closed(within=5)
    assert early == []
    conn.close()


async def test_refusals_go_through_the_error_path(server, http, blob, make_file, make_artifact, make_token, db,
                                                 early):
    _, digest = blob
    async with db.connection() as conn:  # imports stay staged: readers are denied them
        await conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                           "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    staged = await make_artifact(make_file(content=gguf_bytes(n_floats=64), name="s.gguf"), model="staged")
    reader = await make_token("reader")
    conn = await ready(server)
    cases = [(f"/v1/blobs/{digest}", "mc_not_a_token", b"401", b'WWW-Authenticate: Bearer realm="modelcache"'),
             (f"/v1/blobs/{staged.digest}", reader, b"403", b"Content-Type: application/problem+json"),
             (f"/v1/blobs/sha256:{'0' * 64}", reader, b"404", b"Content-Type: application/problem+json"),
             ("/v1/blobs/sha256:nothex", reader, b"400", b"Content-Type: application/problem+json")]
    for path, secret, status, header in cases:
        await conn.send(request("HEAD", path, secret))
        headers, _ = await conn.answer(head=True)
        assert headers.split(b" ")[1] == status, headers
        assert header in headers, headers
    assert early == []
    async with http.get(str(server.make_url("/metrics"))) as r:
        metrics = await r.text()
    assert 'modelcache_blob_pulls_denied_total{status="401"} 1.0' in metrics
    assert 'modelcache_blob_pulls_denied_total{status="403"} 1.0' in metrics
    conn.close()


async def test_a_revoked_token_is_refused_on_the_next_head(server, blob, make_token, db, early):
    _, digest = blob
    secret = await make_token("reader", name="soon-revoked")
    conn = await ready(server)
    path = f"/v1/blobs/{digest}"
    await conn.send(request("HEAD", path, secret))
    assert (await conn.answer(head=True))[0].startswith(b"HTTP/1.1 200")
    async with db.connection() as c:
        await c.execute("UPDATE api_tokens SET revoked_at = now() WHERE name = 'soon-revoked'")
    await server.app[CATALOG].reload()
    await conn.send(request("HEAD", path, secret))
    headers, _ = await conn.answer(head=True)
    assert headers.startswith(b"HTTP/1.1 401"), headers
    assert len(early) == 1
    conn.close()


async def test_heads_answered_early_are_logged_and_counted(server, http, blob, make_token, early, caplog):
    caplog.set_level(logging.INFO, logger="modelcache.access")
    _, digest = blob
    secret = await make_token("reader", name="puller")
    conn = await ready(server)
    for _ in range(3):
        await conn.send(request("HEAD", f"/v1/blobs/{digest}", secret))
        await conn.answer(head=True)
    assert len(early) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "modelcache.access" and " HEAD " in r.getMessage()]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"127.0.0.1 HEAD /v1/blobs/{digest} 200 who=token:puller digest={digest} "
                               "range=- bytes=0 "), lines[0]
    async with http.get(str(server.make_url("/metrics"))) as r:
        metrics = await r.text()
    assert 'modelcache_http_requests_total{method="HEAD",status="200"} 3.0' in metrics
    conn.close()


async def test_keep_alive_bound_runs_from_each_early_answer(start_server, make_settings, blob, make_token, early):
    """keepalive_timeout = 1 s: a connection sending a HEAD every 0.4 s for 2.4 s stays open; once it
    goes quiet, it is closed within the bound."""
    _, digest = blob
    server = await start_server(make_settings(**{"server.keepalive_timeout": 1.0}))
    secret = await make_token("reader")
    conn = await ready(server)
    for _ in range(6):
        await asyncio.sleep(0.4)
        await conn.send(request("HEAD", f"/v1/blobs/{digest}", secret))
        headers, _ = await conn.answer(head=True)
        assert headers.startswith(b"HTTP/1.1 200"), headers
    assert len(early) == 6
    assert await conn.closed(within=3.0)
    conn.close()


async def test_a_client_that_reads_no_answer_is_not_buffered_for(server, blob, make_token, monkeypatch):
    """Pipelined HEADs from a client that never reads: answers wait for the socket to drain (aiohttp's
    path does), so the server stops reading it instead of holding every answer in memory."""
    _, digest = blob
    secret = await make_token("reader")
    buffered = [0]
    blob_head = protocol.Connection._blob_head

    def spy(self, *args):
        buffered[0] = max(buffered[0], self.transport.get_write_buffer_size())
        return blob_head(self, *args)

    monkeypatch.setattr(protocol.Connection, "_blob_head", spy)
    conn = await ready(server)
    batch = request("HEAD", f"/v1/blobs/{digest}", secret) * 500
    sent, started = 0, asyncio.get_running_loop().time()
    while sent < 64 << 20 and asyncio.get_running_loop().time() - started < 8:
        conn.writer.write(batch)
        try:
            await asyncio.wait_for(conn.writer.drain(), 1.0)
        except asyncio.TimeoutError:
            break  # the server stopped reading: what a client that reads nothing should see
        sent += len(batch)
    conn.writer.transport.abort()
    assert buffered[0] < 4 << 20, f"{buffered[0]} bytes of answers held for a client that reads none"
