"""``modelcache import`` through the real CLI, against a real registry and store."""

import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import psycopg
import pytest

from conftest import gguf_bytes, run_cli, safetensors_bytes
from modelcache.formats import detect_type, folder_files, read_capabilities

pytestmark = pytest.mark.registry


@pytest.fixture
def mc(dsn, settings):
    def run(*args):
        return run_cli(*args, "--dsn", dsn, "--data-dir", str(settings.data_dir))

    return run


def query(dsn, sql, *params):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def one_tensor() -> bytes:
    return safetensors_bytes({"w": ("F32", [2])})


def test_import_copies_registers_promotes_audits_and_prints_the_digest(mc, dsn, make_file, settings):
    src = make_file(gguf=True, size=10_000)
    before = (src.stat().st_mtime_ns, src.stat().st_mode)
    done = mc("import", str(src), "--model", "llama3", "--version", "8b-q4", "--vendor", "meta")
    assert done.returncode == 0, done.stderr
    digest = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert done.stdout.strip().splitlines()[-1] == digest
    assert (src.stat().st_mtime_ns, src.stat().st_mode) == before  # untouched without --move
    blob = settings.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob.read_bytes() == src.read_bytes()
    [art] = query(dsn, """SELECT a.artifact_type, a.state, a.size_bytes, a.cache_path, m.name, m.vendor, v.version
                            FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id
                            JOIN models m ON m.id = v.model_id WHERE a.sha256 = %s""", digest[7:])
    size = src.stat().st_size
    assert art == ("gguf", "promoted", size, str(blob), "llama3", "meta", "8b-q4")
    [b] = query(dsn, "SELECT size_bytes, length(xxh3_128), state FROM blobs WHERE digest = %s", digest)
    assert b == (size, 32, "present")
    [audit] = query(dsn, "SELECT subject_type, action, decision, outcome, resource FROM model_audit_log")
    assert audit == ("local", "model_artifact.import", "allow", "created", digest)
    assert "imported" in done.stderr and digest in done.stderr and "MB/s" in done.stderr


def test_move_renames_into_the_store_without_a_second_copy(mc, make_file, settings):
    src = make_file(gguf=True)
    inode = src.stat().st_ino
    done = mc("import", str(src), "--model", "m", "--version", "1", "--move")
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip().splitlines()[-1]
    assert not src.exists()
    assert (settings.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).stat().st_ino == inode


def test_type_is_read_from_content(mc, dsn, make_file):
    st = make_file(content=one_tensor(), name="model.safetensors")
    assert mc("import", str(st), "--model", "st", "--version", "1").returncode == 0
    assert query(dsn, "SELECT artifact_type FROM model_artifacts") == [("safetensors",)]


def test_unknown_content_needs_type(mc, make_file, dsn):
    src = make_file(content=b"just text\n", name="notes.txt")
    done = mc("import", str(src), "--model", "m", "--version", "1")
    assert done.returncode == 1
    assert "notes.txt: cannot tell the artifact type" in done.stderr.strip().splitlines()[-1]
    assert query(dsn, "SELECT count(*) FROM model_artifacts") == [(0,)]


@pytest.mark.parametrize("args,code,fragment", [
    (["--model", "bad name", "--version", "1"], 2, "invalid model name 'bad name'"),
    (["--model", "m", "--version", "-rc"], 2, "invalid version '-rc'"),
    (["--model", "m"], 2, "Missing option '--version'"),
])
def test_bad_usage_is_exit_2_naming_the_value(mc, make_file, args, code, fragment):
    done = mc("import", str(make_file(gguf=True)), *args)
    assert done.returncode == code
    assert fragment in done.stderr


def test_missing_file_is_named(mc, tmp_path, dsn):
    done = mc("import", str(tmp_path / "gone.gguf"), "--model", "m", "--version", "1")
    assert done.returncode == 1
    assert "gone.gguf: no such file" in done.stderr.strip().splitlines()[-1]
    [audit] = query(dsn, "SELECT action, outcome, reason FROM model_audit_log")
    assert audit[0] == "model_artifact.import" and audit[1] == "failed" and "gone.gguf" in audit[2]


def test_same_bytes_same_version_is_a_noop_and_other_model_is_refused(mc, dsn, make_file):
    src = make_file(gguf=True)
    first = mc("import", str(src), "--model", "a", "--version", "1")
    again = mc("import", str(src), "--model", "a", "--version", "1")
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "already present" in again.stderr
    other = mc("import", str(src), "--model", "b", "--version", "1")
    assert other.returncode == 1
    assert "already artifact" in other.stderr and "a:1" in other.stderr
    assert query(dsn, "SELECT count(*) FROM model_artifacts") == [(1,)]


def test_auto_promote_off_leaves_the_artifact_staged(mc, dsn, make_file):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO preference_entries (scope_type, key, value, value_type, updated_by) "
                     "VALUES ('system', 'models.import.auto_promote', 'false', 'boolean', 'test')")
    done = mc("import", str(make_file(gguf=True)), "--model", "m", "--version", "1")
    assert done.returncode == 0
    assert query(dsn, "SELECT state FROM model_artifacts") == [("staged",)]


def test_folder_becomes_one_artifact_of_several_blobs(mc, dsn, tmp_path):
    folder = tmp_path / "snapshot"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(one_tensor())
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / ".cache").write_text("ignored")
    done = mc("import", str(folder), "--model", "tiny-llama", "--version", "main", "--vendor", "acme")
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip().splitlines()[-1]
    files = query(dsn, """SELECT f.path, f.blob_digest, f.size_bytes FROM artifact_files f
                            JOIN model_artifacts a ON a.id = f.artifact_id WHERE a.sha256 = %s ORDER BY f.path""",
                  digest[7:])
    assert [f[0] for f in files] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    for path, blob_digest, size in files:
        data = (folder / path).read_bytes()
        assert blob_digest == "sha256:" + hashlib.sha256(data).hexdigest() and size == len(data)
    [(atype, size)] = query(dsn, "SELECT artifact_type, size_bytes FROM model_artifacts")
    assert atype == "safetensors" and size == sum(f[2] for f in files)


def test_headers_fill_capabilities_and_a_malformed_gguf_is_refused(mc, dsn, make_file):
    done = mc("import", str(make_file(gguf=True)), "--model", "llama3", "--version", "1")
    assert done.returncode == 0, done.stderr
    [(caps,)] = query(dsn, "SELECT capabilities FROM model_versions")
    assert caps["context_length"] == 8192 and caps["architecture"] == "llama" and caps["chat_template"] is True
    bad = make_file(prefix=b"GGUF", size=100, name="broken.gguf")  # the magic, then garbage
    done = mc("import", str(bad), "--model", "broken", "--version", "1")
    assert done.returncode == 1
    assert "broken.gguf" in done.stderr and "malformed GGUF header" in done.stderr
    assert query(dsn, "SELECT count(*) FROM model_artifacts") == [(1,)]


def test_hidden_files_of_a_folder_are_not_part_of_it_for_detection_headers_or_store(mc, dsn, tmp_path, settings):
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(gguf_bytes(arch="qwen2", context_length=4096))
    (folder / "README.md").write_text("a split GGUF\n")
    hidden = {  # what huggingface-cli, editors and rsync leave; each would change the import if it counted
        ".cache/huggingface/download/model.safetensors": b"\x10\0\0\0\0\0\0\0{not a header",
        ".model.safetensors.index.json": json.dumps({"weight_map": {"w": "missing.safetensors"}}).encode(),
        ".README.md.swp": b"\0" * 64,
    }
    for rel, data in hidden.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assert [f.rel for f in folder_files(folder)] == ["README.md", "model.gguf"]
    assert detect_type(folder) == "gguf"  # a hidden .safetensors does not make it a snapshot
    assert read_capabilities(folder, "safetensors")["parameter_count"] == 0  # nor is its header read

    done = mc("import", str(folder), "--model", "split", "--version", "1")
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip().splitlines()[-1]
    [(atype, caps)] = query(dsn, """SELECT a.artifact_type, v.capabilities FROM model_artifacts a
                                      JOIN model_versions v ON v.id = a.model_version_id""")
    assert atype == "gguf" and caps["architecture"] == "qwen2" and caps["context_length"] == 4096
    files = query(dsn, "SELECT path FROM artifact_files f JOIN model_artifacts a ON a.id = f.artifact_id "
                       "WHERE a.sha256 = %s AND path NOT LIKE '.ollama/%%' ORDER BY path", digest[7:])
    assert files == [("README.md",), ("model.gguf",)]
    stored = {p.name for p in (settings.data_dir / "blobs").rglob("*") if p.is_file()}
    for data in hidden.values():
        assert hashlib.sha256(data).hexdigest() not in stored


def _run_in_pty(*args: str) -> tuple[str, str, int]:
    """Run ``modelcache`` with stderr on a pseudo-terminal (80 columns) and stdout on a pipe."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    proc = subprocess.Popen([sys.executable, "-m", "modelcache", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return stdout, terminal.decode(errors="replace"), proc.wait(timeout=120)


def test_import_on_a_terminal_shows_a_bar_and_without_one_prints_none(mc, dsn, make_file, settings):
    src = make_file(gguf=True, size=8 << 20, name="big.gguf")
    stdout, terminal, code = _run_in_pty("import", str(src), "--model", "big", "--version", "1", "--dsn", dsn,
                                         "--data-dir", str(settings.data_dir))
    assert code == 0, terminal
    digest = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert stdout.strip().splitlines()[-1] == digest
    bar = [line for line in terminal.replace("\r", "\n").splitlines() if line.startswith("big.gguf: ")]
    assert bar and "100%|" in bar[-1] and "8.00M/8.00M" in bar[-1], terminal

    other = make_file(gguf=True, size=8 << 20, name="piped.gguf")
    done = mc("import", str(other), "--model", "piped", "--version", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "sha256:" + hashlib.sha256(other.read_bytes()).hexdigest()
    assert "piped.gguf: " not in done.stderr and "%|" not in done.stderr and "\r" not in done.stderr
