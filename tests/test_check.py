"""`termbridge check` as a person runs it: a subprocess against this machine's real Docker, PAM
files and ports; once with a config that should pass, once with one broken in every way."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, TEST_IMAGE, free_port, self_signed_cert, write_config

LINE = re.compile(r"^(ok  |warn|FAIL) (\S+): (.+)$")


def run_check(config: Path | str, **env: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Exit status, {check name: (status, rest of line)}, and the whole output."""
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PATH": os.environ["PATH"], **env},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    *lines, summary = proc.stdout.splitlines()
    checks = {}
    for line in lines:
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        checks[match.group(2)] = (match.group(1).strip(), match.group(3))
    assert re.fullmatch(rf"{len(lines)} checks, \d+ failed.*", summary)
    return proc.returncode, checks, proc.stdout


def test_check_passes_on_this_machine(tmp_path, pam_service):
    cert, key = self_signed_cert(tmp_path)
    config = write_config(
        tmp_path / "ok.toml", tmp_path / "state", pam_service,
        web={"listen": f"127.0.0.1:{free_port()}", "tls_cert": str(cert), "tls_key": str(key)},
        ssh={"listen": f"127.0.0.1:{free_port()}"},
        audit={"log": str(tmp_path / "log" / "audit.log"), "record_dir": str(tmp_path / "casts")},
    )
    (tmp_path / "log").mkdir()
    status, checks, output = run_check(config)
    assert status == 0, output
    assert set(checks) == {"config", "docker", "image", "userns-remap", "pam", "shadow", "web.listen", "ssh.listen",
                           "state_dir", "tls", "audit.log", "audit.record_dir", "assets", "store.url",
                           "store.secret_file"}
    assert checks["store.url"] == ("ok", f"SQLite at {tmp_path / 'state' / 'state.db'} (one host)")
    assert checks["store.secret_file"][0] == "ok" and "created 0600 on first start" in checks["store.secret_file"][1]
    assert all(state in ("ok", "warn") for state, _ in checks.values()), output
    assert re.match(r"Docker \d+\.\d+", checks["docker"][1])
    assert checks["image"][1].startswith(f"{TEST_IMAGE} present")
    assert f"/etc/pam.d/{pam_service}" in checks["pam"][1]
    assert checks["state_dir"] == ("ok", f"{tmp_path / 'state'} will be created")
    assert not (tmp_path / "state").exists() and not (tmp_path / "casts").exists()  # check changes nothing
    assert checks["userns-remap"][0] in ("ok", "warn")  # a warning at most, never a failure


def test_check_names_every_problem_and_its_fix(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    (tmp_path / "k.pem").write_text("")
    config = write_config(
        tmp_path / "broken.toml", a_file / "state", "termbridge-no-such-service",
        web={"listen": f"127.0.0.1:{busy}", "tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(tmp_path / "k.pem")},
        ssh={"listen": "192.0.2.1:2222"},  # a documentation address: not on this host
        session={"image": "termbridge/no-such-image:never"},
        audit={"log": str(a_file / "audit.log"), "record_dir": str(a_file / "casts")},
    )
    try:
        status, checks, output = run_check(config)
    finally:
        blocker.close()
    assert status == 1
    failed = {name: text for name, (state, text) in checks.items() if state == "FAIL"}
    assert set(failed) == {"image", "pam", "web.listen", "ssh.listen", "state_dir", "tls", "audit.log",
                           "audit.record_dir"}, output
    assert "fix: termbridge image build --config" in failed["image"]
    assert "fix: install -m 0644 " in failed["pam"] and "/etc/pam.d/termbridge-no-such-service" in failed["pam"]
    assert f"127.0.0.1:{busy} is in use" in failed["web.listen"]
    assert "192.0.2.1:2222: no such address on this host" in failed["ssh.listen"]
    assert "missing.pem does not exist" in failed["tls"]
    assert all("; fix: " in text for text in failed.values())
    assert checks["docker"][0] == "ok"


def test_check_without_docker_or_with_a_bad_config(tmp_path, pam_service):
    config = write_config(tmp_path / "c.toml", tmp_path / "state", pam_service, web={"listen": "127.0.0.1:0"})
    status, checks, output = run_check(config, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    assert status == 1
    assert checks["docker"][0] == "FAIL" and "cannot be reached" in checks["docker"][1]
    assert "fix: start dockerd" in checks["docker"][1]
    assert checks["image"][0] == "FAIL"
    assert checks["pam"][0] == "ok"

    bad = tmp_path / "bad.toml"
    bad.write_text("[session]\nidle_timeout = 'never'\n")
    status, checks, output = run_check(bad)
    assert status == 1
    assert list(checks) == ["config"]
    assert checks["config"][0] == "FAIL" and "session.idle_timeout" in checks["config"][1]


def test_check_refuses_a_session_uid_range_a_host_group_is_in(tmp_path, pam_service):
    """Session uids must belong to no host account: a group made in the range is named."""
    import secrets

    name, gid = f"tbg{secrets.token_hex(3)}", 3_000_000 + secrets.randbelow(10**6)
    subprocess.run(["groupadd", "-g", str(gid), name], check=True, capture_output=True)
    try:
        config = write_config(tmp_path / "uids.toml", tmp_path / "state", pam_service,
                              session={"uid_base": gid - 100})
        code, checks, out = run_check(config)
        assert code == 1 and checks["config"][0] == "FAIL", out
        assert "session.uid_base" in checks["config"][1] and f"group {name} ({gid})" in checks["config"][1], out
        config.write_text(config.read_text().replace(f"uid_base = {gid - 100}", f"uid_base = {gid + 1}"))
        assert run_check(config)[1]["config"][0] == "ok"
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def test_check_names_root_modes_shared_limits_without_userns_remap(tmp_path, pam_service):
    config = write_config(tmp_path / "root.toml", tmp_path / "state", pam_service, session={"user": "root"})
    _, checks, out = run_check(config)
    status, line = checks["userns-remap"]
    if status == "warn":  # this machine's dockerd runs without userns-remap
        assert "session.user = root" in line and "per-uid kernel limits" in line, out
    else:
        assert status == "ok", out


def test_check_reaches_the_store_and_finds_its_key_file_private(tmp_path, pam_service, redis_url):
    """store.url: a Redis that answers, then one that does not; store.secret_file: missing (a
    fleet's gateways must share it: a warning), open to others (FAIL), unreadable bytes, 0600."""
    key = tmp_path / "store-key"

    def config(url: str):
        return write_config(tmp_path / "c.toml", tmp_path / "state", pam_service, web={"listen": "127.0.0.1:0"},
                            store={"url": url, "secret_file": str(key)})

    _, checks, output = run_check(config(redis_url))
    assert checks["store.url"][0] == "ok" and "answers" in checks["store.url"][1], output
    assert checks["store.secret_file"][0] == "warn" and "needs the same file" in checks["store.secret_file"][1]
    assert not key.exists()  # check creates nothing

    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    status, checks, output = run_check(config(redis_url))
    assert status == 1 and checks["store.secret_file"][0] == "FAIL", output
    assert "open to group or others" in checks["store.secret_file"][1] and f"fix: chmod 600 {key}" in checks["store.secret_file"][1]

    key.chmod(0o600)
    _, checks, output = run_check(config(redis_url))
    assert checks["store.secret_file"] == ("ok", f"{key} is readable, mode 0600 (every gateway sharing store.url needs the same file)")

    key.write_bytes(b"short")
    _, checks, _ = run_check(config(redis_url))
    assert checks["store.secret_file"][0] == "FAIL" and "exactly 32 bytes" in checks["store.secret_file"][1]

    status, checks, output = run_check(config(f"redis://127.0.0.1:{free_port()}/0"))
    assert status == 1 and checks["store.url"][0] == "FAIL", output
    assert "cannot be reached" in checks["store.url"][1] and "fix: start the Redis server" in checks["store.url"][1]


def test_check_wants_a_swarm_manager_for_the_swarm_backend(tmp_path, pam_service):
    """This machine's engine is no Swarm member: with session.backend = swarm that is a failure
    that says where to point the gateway (tests/test_swarm.py runs it against a manager)."""
    config = write_config(tmp_path / "swarm.toml", tmp_path / "state", pam_service,
                          web={"listen": f"127.0.0.1:{free_port()}"}, ssh={"listen": f"127.0.0.1:{free_port()}"},
                          session={"backend": "swarm"})
    status, checks, output = run_check(config)
    assert status == 1, output
    assert checks["swarm"][0] == "FAIL" and "not a Swarm manager" in checks["swarm"][1], output
