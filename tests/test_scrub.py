"""The periodic scrub in a real server process: a blob corrupted on disk is quarantined and refused."""

import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import run_cli
from test_embedded import free_port, wait_ready

pytestmark = pytest.mark.registry


def test_periodic_scrub_quarantines_a_corrupted_blob_and_the_server_refuses_it(dsn, tmp_path, make_file):
    data = tmp_path / "data"
    src = make_file(gguf=True, size=1 << 20)
    digest = run_cli("import", str(src), "--model", "m", "--version", "1", "--dsn", dsn,
                     "--data-dir", str(data)).stdout.strip().splitlines()[-1]
    secret = run_cli("token", "create", "--role", "node", "--name", "n", "--dsn", dsn).stdout.strip().splitlines()[-1]
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "modelcache", "serve", "--dsn", dsn, "--data-dir", str(data),
                             "--host", "127.0.0.1", "--port", str(port)], stderr=log,
                            env={**os.environ, "MODELCACHE_STORAGE_SCRUB_INTERVAL": "0.5"})
    url = f"http://127.0.0.1:{port}/v1/blobs/{digest}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    try:
        wait_ready(port, proc)
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
        blob = data / "blobs" / "sha256" / digest[7:9] / digest[7:]
        os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
        with open(blob, "r+b") as f:  # same size, different bytes: only a re-hash can tell
            f.seek(1000)
            f.write(b"\0" * 16)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    pass
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
                # for a moment the file is gone before the catalog hears it was quarantined
                if b"quarantined" in exc.read():
                    break
            assert time.monotonic() < deadline, "the scrub did not quarantine the corrupted blob"
            time.sleep(0.2)
        assert (data / "quarantine" / digest[7:]).exists()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "QUARANTINED blob " + digest in text and "content changed" in text
