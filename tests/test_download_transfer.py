"""The byte transfer of downloads against real servers on loopback: parts, single-flight, the budget, retries.

nginx (Debian) serves the files and logs every request's status, bytes and
Range; a real TCP proxy in front of it answers 429/503 for the first
connections. Never a mock of our own client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import psycopg
import pytest

from conftest import gguf_bytes
from test_downloads import (ENDED, LoopbackProxy, Nginx, allow, audit_rows, free_port, make_download_settings,  # noqa: F401
                            nginx_dirs, put, request_download, wait_for, worker)

pytestmark = pytest.mark.registry

MIB = 1 << 20


class Upstream(Nginx):
    """nginx with the locations these tests need: plain, per-connection rate limits, and no ranges at all."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root, self.workdir, self.port = root, workdir, free_port()
        self.log = workdir / "access.log"
        self.start(f"""
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    location /slow/ {{ alias {root}/; limit_rate 8m; }}
    location /norange/ {{ alias {root}/; max_ranges 0; limit_rate 16m; }}
  }}""")


@pytest.fixture
def nginx(tmp_path):
    server = Upstream(*nginx_dirs(tmp_path))
    yield server
    server.stop()


class RefusingProxy(LoopbackProxy):
    """The first ``refusals`` connections get ``status`` (with Retry-After); the rest reach the upstream."""

    def __init__(self, upstream_port: int, refusals: int, status: str = "429 Too Many Requests",
                 retry_after: str | None = "1") -> None:
        super().__init__(upstream_port)
        self.refusals, self.status, self.retry_after = refusals, status, retry_after

    async def _serve(self, n: int, reader, writer) -> None:
        try:
            if n < self.refusals:
                await reader.readuntil(b"\r\n\r\n")
                extra = f"Retry-After: {self.retry_after}\r\n" if self.retry_after else ""
                writer.write(f"HTTP/1.1 {self.status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
                             .encode())
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def pipe(src, dst) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def parts_settings(make_download_settings, sources: dict[str, str], **overrides):
    return make_download_settings(sources, **{"downloads.part_threshold_bytes": MIB, "downloads.parallel_parts": 2,
                                              **overrides})


def file_entries(nginx: Nginx, name: str) -> list[dict]:
    return [e for e in nginx.entries() if e["uri"].endswith("/" + name)]


# -- parallel ranged parts ------------------------------------------------------


async def test_a_big_file_comes_in_ranged_parts_and_verifies(nginx, make_download_settings, start_server, worker,
                                                             db, http, make_token, store):
    content = gguf_bytes(n_floats=6 * MIB)  # 24 MiB: three parts of 8 MiB
    digest = put(nginx, "big.gguf", content)
    settings = parts_settings(make_download_settings, {"local": nginx.url})
    await allow(db, "local")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="local", reference="files/big.gguf", model="big",
                                   version="1", sha256=digest)
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "completed" and done["digest"] == digest, done
    entries = file_entries(nginx, "big.gguf")
    ranged = [e for e in entries if e["status"] == 206]
    assert len(ranged) >= 2 and len({e["range"] for e in ranged}) == len(ranged), entries
    assert all(e["if_range"] not in ("-", "") for e in ranged)  # the validator on every part
    assert sum(e["bytes"] for e in entries) < 1.5 * len(content)
    assert list(store.downloads_dir.iterdir()) == []


async def test_a_restart_mid_way_fetches_only_the_missing_parts(nginx, make_download_settings, start_server, worker,
                                                                db, http, make_token, store):
    content = gguf_bytes(n_floats=8 * MIB)  # 32 MiB: four parts, 8 MiB/s a connection, two at once
    digest = put(nginx, "big.gguf", content)
    settings = parts_settings(make_download_settings, {"slow": nginx.url + "slow/"})
    await allow(db, "slow")
    server = await start_server(settings)
    first = await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="slow", reference="files/big.gguf", model="big",
                                   version="1", sha256=digest)
    sidecar = store.downloads_dir / f"{asked['id']}.json"
    deadline = time.monotonic() + 20
    while '"parts": [[' not in (sidecar.read_text() if sidecar.exists() else ""):  # a part recorded as done
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await first.stop()
    kept = [start for start, _ in json.loads(sidecar.read_text())["parts"]]
    before = file_entries(nginx, "big.gguf")
    assert sum(e["bytes"] for e in before) < len(content)
    await worker(settings)
    done = await wait_for(http, server, token, asked["id"], timeout=30)
    assert done["state"] == "completed" and done["digest"] == digest, done
    assert done["attempts"] == 2
    entries = file_entries(nginx, "big.gguf")
    assert sum(e["bytes"] for e in entries) < 1.5 * len(content)
    after = entries[len(before):]
    assert after and all(e["status"] == 206 and e["if_range"] != "-" for e in after)
    assert not {int(e["range"][6:].split("-")[0]) for e in after} & set(kept)  # no part fetched twice


async def test_an_upstream_without_ranges_is_fetched_as_one_stream(nginx, make_download_settings, start_server,
                                                                    worker, db, http, make_token):
    content = gguf_bytes(n_floats=4 * MIB)  # 16 MiB, above the threshold
    digest = put(nginx, "big.gguf", content)
    settings = parts_settings(make_download_settings, {"plain": nginx.url + "norange/"})
    await allow(db, "plain")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="plain", reference="files/big.gguf", model="big",
                                   version="1")
    done = await wait_for(http, server, token, asked["id"])
    assert done["state"] == "completed" and done["digest"] == digest, done
    entries = file_entries(nginx, "big.gguf")
    assert [e["status"] for e in entries] == [200] and entries[0]["bytes"] == len(content)


# -- single-flight ------------------------------------------------------------------


async def test_two_requests_for_the_same_file_share_one_transfer(nginx, make_download_settings, start_server,
                                                                 worker, db, dsn, http, make_token):
    content = gguf_bytes(n_floats=2 * MIB)  # 8 MiB at 8 MiB/s
    digest = put(nginx, "model.gguf", content)
    settings = make_download_settings({"slow": nginx.url + "slow/"})
    await allow(db, "slow")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = [await request_download(http, server, token, source="slow", reference="files/model.gguf",
                                    model="tiny", version=v) for v in ("1", "1", "2")]
    done = [await wait_for(http, server, token, a["id"]) for a in asked]
    assert [d["state"] for d in done] == ["completed"] * 3, done
    assert {d["digest"] for d in done} == {digest} and len({d["artifact_id"] for d in done}) == 1
    entries = file_entries(nginx, "model.gguf")
    assert len(entries) == 1 and entries[0]["bytes"] == len(content)  # one upstream fetch for three jobs
    shares = audit_rows(dsn, "model_download.share")
    assert len(shares) == 2
    reasons = sorted(r[2] or "" for r in shares)
    assert reasons[0] == "" and "one content has one artifact" in reasons[1] and "tiny:1" in reasons[1]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM model_artifacts").fetchone()[0] == 1


# -- egress ---------------------------------------------------------------------------


async def test_concurrent_downloads_share_the_bandwidth_budget(nginx, make_download_settings, start_server, worker,
                                                               db, http, make_token):
    budget = 2 * MIB
    contents = [gguf_bytes(n_floats=(3 * MIB // 4) + i) for i in range(2)]  # two files of ~3 MiB
    digests = [put(nginx, f"m{i}.gguf", c) for i, c in enumerate(contents)]
    settings = make_download_settings({"local": nginx.url}, **{"downloads.max_bytes_per_second": budget})
    await allow(db, "local")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    started = time.monotonic()
    asked = [await request_download(http, server, token, source="local", reference=f"files/m{i}.gguf",
                                    model=f"m{i}", version="1") for i in range(2)]
    done = [await wait_for(http, server, token, a["id"], timeout=30) for a in asked]
    elapsed = time.monotonic() - started
    assert [d["digest"] for d in done] == digests, done
    assert [d["state"] for d in done] == ["completed"] * 2
    size = sum(len(c) for c in contents)
    assert elapsed >= size / budget * 0.8, f"{size} bytes in {elapsed:.2f}s with a budget of {budget} B/s"


# -- retries --------------------------------------------------------------------------


async def test_429_with_retry_after_then_200_completes_and_the_retry_shows(nginx, make_download_settings,
                                                                          start_server, worker, db, http,
                                                                          make_token, caplog):
    caplog.set_level(logging.INFO)
    digest = put(nginx, "model.gguf", gguf_bytes(n_floats=64 * 1024))
    proxy = RefusingProxy(nginx.port, refusals=1, retry_after="2")
    url = await proxy.start()
    settings = make_download_settings({"busy": url}, **{"downloads.retry_seconds": 0.1})
    await allow(db, "busy")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    started = time.monotonic()
    asked = await request_download(http, server, token, source="busy", reference="files/model.gguf",
                                   model="tiny", version="1")
    waiting = await wait_for(http, server, token, asked["id"], timeout=10,
                             until=lambda b: b["state"] == "running" and b["error"])
    assert "429" in waiting["error"] and "asking again in 2.0s" in waiting["error"]  # visible while it waits
    done = await wait_for(http, server, token, asked["id"])
    await proxy.stop()
    assert done["state"] == "completed" and done["digest"] == digest and done["error"] is None, done
    assert time.monotonic() - started >= 1.8  # Retry-After was honoured over retry_seconds
    assert proxy.connections == 2
    assert "429 Too Many Requests; asking again in 2.0s (attempt 2 of 6)" in caplog.text


async def test_an_upstream_that_stays_down_fails_with_the_last_reason(nginx, make_download_settings, start_server,
                                                                      worker, db, http, make_token):
    put(nginx, "model.gguf", gguf_bytes(n_floats=1024))
    proxy = RefusingProxy(nginx.port, refusals=100, status="503 Service Unavailable", retry_after=None)
    url = await proxy.start()
    settings = make_download_settings({"down": url}, **{"downloads.retries": 2, "downloads.retry_seconds": 0.1})
    await allow(db, "down")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    asked = await request_download(http, server, token, source="down", reference="files/model.gguf",
                                   model="tiny", version="1")
    done = await wait_for(http, server, token, asked["id"])
    await proxy.stop()
    assert done["state"] == "failed" and "503 Service Unavailable (3 attempts" in done["error"], done
    assert proxy.connections == 3


async def test_a_source_runs_at_most_max_concurrent_downloads(nginx, tmp_path, dsn, start_server, worker, db, http,
                                                              make_token):
    for i in range(2):
        put(nginx, f"m{i}.gguf", gguf_bytes(n_floats=MIB // 2 + i))  # 2 MiB each at 8 MiB/s
    conf = tmp_path / "cap.toml"
    conf.write_text(f'[sources.slow]\nkind = "http"\nurl = "{nginx.url}slow/"\nmax_concurrent = 1\n\n'
                    '[downloads]\npoll_seconds = 0.2\n')
    from modelcache import config
    settings = config.load(conf, env={}, overrides={"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn})
    assert settings.sources["slow"].max_concurrent == 1
    await allow(db, "slow")
    server = await start_server(settings)
    await worker(settings)
    token = await make_token("operator")
    ids = [(await request_download(http, server, token, source="slow", reference=f"files/m{i}.gguf",
                                   model=f"m{i}", version="1"))["id"] for i in range(2)]
    most = 0
    deadline = time.monotonic() + 20
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            states = [conn.execute("SELECT state FROM model_downloads WHERE id = %s", (i,)).fetchone()[0]
                      for i in ids]
            most = max(most, states.count("running"))
            if all(s in ENDED for s in states):
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
    assert states == ["completed", "completed"] and most == 1
