"""Config: TOML + TERMBRIDGE_* overrides, typed and validated once; errors name the key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bridge.config import Config, env_name, known_keys, load_config, parse_duration, parse_size
from bridge.errors import ConfigError
from helpers import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec(tmp_path):
    config = load_config(write(tmp_path, ""), env={})
    assert config.state_dir == Path("/var/lib/termbridge")
    assert config.web.listen == ("127.0.0.1", 8080)
    assert config.web.metrics_allow == ("127.0.0.1", "::1")
    assert config.ssh.listen == ("0.0.0.0", 2222)
    assert config.ssh_host_key == Path("/var/lib/termbridge/ssh_host_ed25519_key")
    assert config.auth.pam_service == "termbridge"
    s = config.session
    assert (s.image, s.cpus, s.memory, s.pids) == ("termbridge/session:latest", 0.5, 200 * 2**20, 256)
    assert (s.idle_timeout, s.max_lifetime, s.reconnect_grace) == (900, 8 * 3600, 60)
    assert (s.max_per_user, s.max_total, s.network, s.user, s.pool) == (3, 50, "isolated", "login", 0)
    assert config.audit.log == "" and config.audit.record_dir is None
    assert (s.backend, s.placement, s.swarm_network) == ("docker", (), "termbridge-sessions")


def test_file_values_and_env_overrides(tmp_path):
    path = write(tmp_path, 'state_dir = "/srv/tb"\n[session]\nidle_timeout = "2m"\nmemory = "1g"\n[web]\nlisten = "[::1]:9000"\n')
    config = load_config(path, env={"TERMBRIDGE_SESSION_IDLE_TIMEOUT": "60s", "TERMBRIDGE_AUTH_ALLOWED_GROUPS": "a, b",
                                    "TERMBRIDGE_STATE_DIR": "/srv/other", "PATH": "/bin"})
    assert config.session.idle_timeout == 60
    assert config.session.memory == 2**30
    assert config.web.listen == ("::1", 9000)
    assert config.auth.allowed_groups == ("a", "b")
    assert config.state_dir == Path("/srv/other")
    with pytest.raises(AttributeError):
        config.session = None  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, key",
    [
        ("[session]\nidle_timout = '1m'\n", "session.idle_timout"),
        ("[sesion]\nimage = 'x'\n", "sesion"),
        ("bogus = 1\n", "bogus"),
        ("[session]\nidle_timeout = 'soon'\n", "session.idle_timeout"),
        ("[session]\nmemory = 'lots'\n", "session.memory"),
        ("[session]\ncpus = -1\n", "session.cpus"),
        ("[session]\nnetwork = 'open'\n", "session.network"),
        ("[session]\nmax_total = 0\n", "session.max_total"),
        ("[web]\nlisten = 'nowhere'\n", "web.listen"),
        ("[web]\npublic_origin = 'example.org'\n", "web.public_origin"),
        ("[web]\ntrusted_proxies = ['not-an-ip']\n", "web.trusted_proxies"),
        ("[session]\nmax_per_user = 10\nmax_total = 5\n", "session.max_per_user"),
        ("[web]\ntls_cert = '/x.pem'\n", "web.tls_cert"),
        ("session = 3\n", "session"),
        ("[session\n", "not valid TOML"),
        ("[session]\nfirewall = 'maybe'\n", "session.firewall"),
        ("[session]\ntmpfs_size = 'huge'\n", "session.tmpfs_size"),
        ("[auth]\nmax_failures = 0\n", "auth.max_failures"),
        ("[auth]\nlockout = 'forever'\n", "auth.lockout"),
        ("[web]\nmax_message_size = 'big'\n", "web.max_message_size"),
        ("[session]\ninternet_allow = ['10.1.2.0/33']\n", "session.internet_allow"),
        ("[session]\ndns = ['10.1.2.0/24']\n", "session.dns"),
        ("[session]\ndns = ['127.0.0.53']\n", "session.dns"),
        ("[session]\nuid_base = 1000\n", "session.uid_base"),
        ("[session]\nbackend = 'kubernetes'\n", "session.backend"),
        ("[session]\nplacement = ['node.role=worker']\n", "session.placement"),
        ("[session]\nbackend = 'swarm'\nnetwork = 'internet'\n", "session.backend"),
    ],
)
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert key in str(info.value)


def test_unknown_env_variable_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="TERMBRIDGE_SESSION_IDLE"):
        load_config(write(tmp_path, ""), env={"TERMBRIDGE_SESSION_IDLE": "1m"})
    with pytest.raises(ConfigError, match="session.pids"):
        load_config(write(tmp_path, ""), env={"TERMBRIDGE_SESSION_PIDS": "many"})


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_units():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("8h") == 28800
    assert parse_duration(30) == 30
    assert parse_size("200m") == 200 * 2**20 and parse_size("1g") == 2**30 and parse_size("512k") == 512 * 1024
    for bad in ("", "0s", "-1m", "1x", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("", "0", "1t", "2.5g"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_sample_config_documents_every_key():
    sample = tomllib.loads((ROOT / "etc" / "termbridge.toml").read_text())
    keys = [k for k in sample if not isinstance(sample[k], dict)]
    keys += [f"{s}.{k}" for s, v in sample.items() if isinstance(v, dict) for k in v]
    assert sorted(keys) == sorted(known_keys())
    assert load_config(ROOT / "etc" / "termbridge.toml", env={}) == Config()
    assert env_name("session.idle_timeout") == "TERMBRIDGE_SESSION_IDLE_TIMEOUT"


@pytest.mark.parametrize("command", [["serve"], ["image", "build"]])
def test_cli_config_errors_exit_2_and_start_nothing(tmp_path, command):
    bad = write(tmp_path, "[session]\nidle_timeout = 'never'\n")
    for config_arg, needle in ((str(bad), "session.idle_timeout"), (str(tmp_path / "missing.toml"), "does not exist")):
        proc = subprocess.run(
            [sys.executable, "-m", "bridge", *command, "--config", config_arg],
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr


def test_security_defaults_and_switches(tmp_path):
    config = load_config(write(tmp_path, ""), env={})
    assert config.session.firewall is True and config.session.tmpfs_size == 64 * 2**20
    assert config.web.max_message_size == 2**20
    a = config.auth
    assert (a.max_failures, a.max_failures_per_address, a.failure_window, a.lockout) == (5, 20, 900, 300)
    off = load_config(write(tmp_path, ""), env={"TERMBRIDGE_SESSION_FIREWALL": "false"})
    assert off.session.firewall is False
