"""Configuration: defaults < TOML < environment < flags, validated once, one clear line per bad value."""

import re
from pathlib import Path

import pytest

from conftest import run_cli
from modelcache import config
from modelcache.errors import ConfigError


def test_defaults(tmp_path):
    s = config.load(env={})
    assert s.server.port == 12085


def test_example_config_sources_load_once_uncommented(tmp_path):
    """Each commented ``# [sources.<id>]`` example is a valid source, and together they show every kind."""
    text = (Path(__file__).parent.parent / "config" / "modelcache.example.toml").read_text()
    blocks = re.findall(r"^# (\[sources\.[^\n]*\n(?:# [^\n]*\n)*)", text, flags=re.M)
    uncommented = "\n".join(re.sub(r"^# ", "", block, flags=re.M) for block in blocks)
    path = tmp_path / "sources.toml"
    path.write_text(uncommented)
    s = config.load(path, env={})
    assert {source.kind for source in s.sources.values()} == set(config.SOURCE_KINDS)
    assert s.server.trusted_networks == ()
    assert s.database.dsn == ""
    assert s.import_dir == s.data_dir / "import"
    assert s.log.format == "text"


def test_precedence_toml_then_env_then_flags(tmp_path):
    toml = tmp_path / "mc.toml"
    toml.write_text('[server]\nport = 1000\nhost = "127.0.0.1"\n[storage]\ndata_dir = "/srv/a"\n'
                    '[log]\nformat = "json"\n')
    s = config.load(toml, env={"MODELCACHE_SERVER_PORT": "2000"}, overrides={"server.port": None})
    assert (s.server.port, s.server.host, s.data_dir, s.log.format) == (2000, "127.0.0.1", Path("/srv/a"), "json")
    s = config.load(toml, env={"MODELCACHE_SERVER_PORT": "2000"}, overrides={"server.port": "3000"})
    assert s.server.port == 3000
    s = config.load(env={"MODELCACHE_CONFIG": str(toml)})
    assert s.server.port == 1000


def test_trusted_networks_from_env_and_toml(tmp_path):
    s = config.load(env={"MODELCACHE_SERVER_TRUSTED_NETWORKS": "10.0.0.0/8, ::1/128"})
    assert [str(n) for n in s.server.trusted_networks] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize("env,fragment", [
    ({"MODELCACHE_SERVER_PORT": "http"}, "server.port = 'http' (from environment MODELCACHE_SERVER_PORT)"),
    ({"MODELCACHE_SERVER_PORT": "70000"}, "server.port = '70000'"),
    ({"MODELCACHE_LOG_FORMAT": "xml"}, "log.format = 'xml'"),
    ({"MODELCACHE_SERVER_TRUSTED_NETWORKS": "10.0.0.0/33"}, "server.trusted_networks = '10.0.0.0/33'"),
    ({"MODELCACHE_SYNCD_SETTLE_SECONDS": "-1"}, "syncd.settle_seconds = '-1'"),
    ({"MODELCACHE_SYNCD_FORCE_POLLING": "maybe"}, "syncd.force_polling = 'maybe'"),
    ({"MODELCACHE_SERVER_PUBLIC_URL": "ftp://x"}, "server.public_url = 'ftp://x'"),
])
def test_bad_values_name_key_and_value(env, fragment):
    with pytest.raises(ConfigError) as err:
        config.load(env=env)
    assert fragment in err.value.detail


def test_bad_toml_is_named(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[server]\nport = 12085\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key server.prot"):
        config.load(toml, env={})
    toml.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(toml, env={})
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml", env={})


def test_cli_stops_on_a_bad_value_with_one_line_and_exit_2(tmp_path):
    done = run_cli("serve", "--port", "eighty", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "modelcache: error: server.port = 'eighty' (from command line): expected an integer from 0 to 65535"]


def test_every_process_takes_host_and_port_and_host_verbs_do_not(tmp_path):
    for process in ("run", "serve", "syncd", "fetchd"):
        done = run_cli(process, "--port", "eighty", "--data-dir", str(tmp_path))
        assert done.returncode == 2 and "server.port = 'eighty' (from command line)" in done.stderr, process
    done = run_cli("import", str(tmp_path), "--model", "m", "--version", "1", "--port", "1")
    assert done.returncode == 2 and "No such option '--port'" in done.stderr


def test_example_config_documents_every_key_and_loads():
    example = Path(__file__).parent.parent / "config" / "modelcache.example.toml"
    s = config.load(example, env={})
    text = example.read_text()
    for section, keys in config._PARSERS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} undocumented"
    assert s.server.port == 12085
