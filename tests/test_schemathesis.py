"""schemathesis against the running server with an admin token: the OpenAPI description and the
code cannot drift, and no input makes the server answer 500."""

import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from test_embedded import free_port, wait_ready

pytestmark = [pytest.mark.registry, pytest.mark.e2e]


def test_schemathesis_finds_no_drift_and_no_server_error(dsn, tmp_path, make_file):
    st = Path(sys.executable).with_name("st")
    assert st.exists() or shutil.which("st"), "schemathesis is part of the test extra"
    data = tmp_path / "data"
    name = f"st-admin-{secrets.token_hex(8)}"
    token = run_cli("token", "create", "--role", "admin", "--name", name, "--dsn", dsn, "--data-dir", str(data))
    assert token.returncode == 0, token.stderr
    secret = token.stdout.strip().splitlines()[-1]
    done = run_cli("import", str(make_file(gguf=True)), "--model", "m", "--version", "1", "--dsn", dsn,
                   "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # a file: a pipe nobody reads would block the server
    proc = subprocess.Popen([sys.executable, "-m", "modelcache", "serve", "--dsn", dsn, "--data-dir", str(data),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_ready(port, proc)
        result = subprocess.run(
            [str(st), "run", f"http://127.0.0.1:{port}/v1/openapi.json", "-H", f"Authorization: Bearer {secret}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_schema_conformance",
             # revoking tokens would revoke this run's own (it is listed by GET /v1/tokens); test_api covers it
             "--exclude-operation-id", "revoke_token",
             # a long-poll may rightly outlast the request timeout (wait up to 60 s); test_nodes covers it
             "--exclude-operation-id", "list_loads",
             # one worker: CPython 3.11's ast.parse is not thread-safe, and hypothesis calls it
             "--max-examples", "100", "--seed", "20261127", "--generation-deterministic",
             "--workers", "1",
             "--phases", "examples,coverage,fuzzing", "--request-timeout", "10"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
    # tracebacks the server logged; aiohttp's own report of a malformed request (a 400) is not ours
    log_lines = (tmp_path / "server.log").read_text().splitlines()
    server_errors = ["\n".join(log_lines[max(0, i - 12):i + 1]) for i, line in enumerate(log_lines)
                     if re.match(r"[A-Za-z_.]+(Error|Exception)\b", line) and "BadHttpMessage" not in line]
    assert result.returncode == 0, result.stdout[:6000] + result.stdout[-1500:] + result.stderr[-2000:]
    assert not server_errors, server_errors[:5]
