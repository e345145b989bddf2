"""The gateway as a process: leftovers reaped after a SIGKILL, Docker unreachable handled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from bridge.backends.docker import DockerBackend
from helpers import PROMPT, ROOT, containers_gone, session_containers, wait_for, write_config


async def test_sigkilled_gateway_leftovers_are_reaped_on_restart(gateway_process, user):
    """A crashed gateway's web session is kept at restart (its page may come back); nobody does
    within reconnect_grace, so it ends and its container goes."""
    process = gateway_process(session={"reconnect_grace": "4s"})
    await process.start()
    gw = process.gateway
    async with await gw.login(user) as http:
        term = await gw.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        process.signal(signal.SIGKILL)
        await process.wait(10)
    [leftover] = session_containers(**{"termbridge.session": session["id"]})
    assert leftover.status == "running"
    await process.start()
    await asyncio.sleep(1)
    assert [c.status for c in session_containers(**{"termbridge.session": session["id"]})] == ["running"]
    await containers_gone(**{"termbridge.session": session["id"]})
    assert "disconnected: nobody came back after the restart" in process.log()


async def test_docker_unreachable(start_gateway, user, state_dir, tmp_path):
    from bridge.config import SessionConfig

    nowhere = f"unix://{tmp_path}/no-docker.sock"
    gateway = await start_gateway(backend=DockerBackend(SessionConfig(), "test-unreachable", base_url=nowhere))
    async with aiohttp.ClientSession(base_url=gateway.url) as anon:
        resp = await anon.get("/healthz")
        assert resp.status == 503 and "docker" in (await resp.text()).lower()
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        error = await term.control("error")
        assert "container service is unavailable" in error["message"]
        assert (await term.control("exit"))["reason"] == "error"
        # and the gateway keeps serving
        resp = await http.get("/", allow_redirects=False)
        assert resp.status == 200
        again = await gateway.terminal(http)
        assert "unavailable" in (await again.control("error"))["message"]


async def test_missing_image_is_a_clear_error(start_gateway, user):
    gateway = await start_gateway(session={"image": "termbridge/does-not-exist:nope"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        error = await term.control("error")
        assert "session image is not installed" in error["message"]
        assert (await term.control("exit"))["reason"] == "error"
    await containers_gone(**{"termbridge.user": user.name})


async def test_shutdown_ends_sessions_and_removes_containers(start_gateway, user):
    gateway = await start_gateway()
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        from bridge.web.keys import MANAGER

        await asyncio.wait_for(gateway.app[MANAGER].close(), 15)
        exit_msg = await term.control("exit")
        assert exit_msg["reason"] == "killed" and "shutting down" in exit_msg["message"]
    await containers_gone(**{"termbridge.session": session["id"]})
    assert os.path.isdir(gateway.config.state_dir)
    assert oct(os.stat(gateway.config.state_dir).st_mode & 0o777) == "0o700"


async def test_sigterm_drains_within_10_seconds(gateway_process, user):
    process = gateway_process(session={"on_shutdown": "end"})
    await process.start()
    gw = process.gateway
    async with await gw.login(user) as http:
        terms = [await gw.terminal(http) for _ in range(2)]
        ids = [(await t.control("session"))["id"] for t in terms]
        for t in terms:
            await t.expect(PROMPT)
        process.signal(signal.SIGTERM)
        for t in terms:
            exit_msg = await t.control("exit", timeout=10)
            assert exit_msg["reason"] == "killed" and "shutting down" in exit_msg["message"]
        assert await process.wait(10) == 0
    for session_id in ids:
        assert not session_containers(**{"termbridge.session": session_id})


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_sessions_list_and_kill(gateway, user):
    cfg = str(gateway.config_path)
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        code, out, err = await run_cli("sessions", "list", "--config", cfg)
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == ["ID", "USER", "DOOR", "PROFILE", "CONTAINER", "STARTED", "IDLE", "GATEWAY"]
        [row] = [r.split() for r in rows if r.startswith(session["id"])]
        assert row[1:5] == [user.name, "web", "default", f"termbridge-{session['id'][:8]}"]

        code, _, err = await run_cli("sessions", "kill", "nosuchid", "--config", cfg)
        assert code == 1 and "no live session" in err
        code, out, err = await run_cli("sessions", "kill", session["id"][:10], "--config", cfg)
        assert code == 0 and session["id"] in out, err
        exit_msg = await term.control("exit")
        assert exit_msg["reason"] == "killed" and "administrator" in exit_msg["message"]
    await containers_gone(**{"termbridge.session": session["id"]})
    code, out, _ = await run_cli("sessions", "list", "--config", cfg)
    assert code == 0 and session["id"] not in out


async def test_admin_socket_is_root_only(gateway, user):
    import pwd

    from bridge.admin import socket_path

    path = socket_path(gateway.config.state_dir)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    uid = pwd.getpwnam(user.name).pw_uid
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        f"try:\n s.connect({str(path)!r}); print('connected')\n"
        "except PermissionError: print('denied')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", probe, stdout=asyncio.subprocess.PIPE, preexec_fn=lambda: os.setuid(uid)
    )
    out, _ = await proc.communicate()
    assert out.decode().strip() == "denied"


async def test_sessions_commands_without_a_gateway(tmp_path):
    cfg = write_config(tmp_path / "none.toml", tmp_path / "empty-state", "termbridge")
    code, _, err = await run_cli("sessions", "list", "--config", str(cfg))
    assert code == 1 and "not running" in err


def _dockerd_pids() -> list[int]:
    out = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="stops and restarts dockerd: only under CI=true")
async def test_docker_outage_then_recovery(gateway, user):
    async with aiohttp.ClientSession(base_url=gateway.url) as anon, await gateway.login(user) as http:
        for pid in _dockerd_pids():
            os.kill(pid, signal.SIGTERM)
        try:
            # gone for good (its pid file too), not merely unresponsive
            await wait_for(lambda: not _dockerd_pids(), timeout=60, what="dockerd to exit")
            resp = await anon.get("/healthz")
            assert resp.status == 503
            term = await gateway.terminal(http)
            assert "unavailable" in (await term.control("error"))["message"]
            assert (await anon.get("/login")).status == 200  # still serving
        finally:
            await _start_dockerd()

        async def healthy() -> bool:
            return (await anon.get("/healthz")).status == 200

        await wait_for(healthy, timeout=30, what="/healthz to recover")
        term = await gateway.terminal(http)
        session = await term.control("session", timeout=60)
        await term.expect(PROMPT)
        assert (await term.run("echo back")).strip() == "back"
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": session["id"]})


async def _start_dockerd() -> None:
    """Start dockerd again as scripts/setup-host.sh does, retrying while the old one's leftovers clear."""
    for _ in range(5):
        if _docker_up():
            return
        if not _dockerd_pids():
            with open("/tmp/termbridge-test-dockerd.log", "ab") as log:
                subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        try:
            await wait_for(_docker_up, timeout=20, what="dockerd to come back")
            return
        except AssertionError:
            continue
    raise AssertionError("dockerd did not come back: see /tmp/termbridge-test-dockerd.log")


async def test_a_resource_that_fails_to_start_releases_those_started_before_it(
    tmp_path, pam_service, docker_engine, state_dir
):
    """The SSH door cannot listen (its address is taken) after the warm pool began making a
    container: the gateway does not start, and everything started before the door is released:
    the pooled container is removed, the Docker client and the audit file are closed."""
    import secrets
    import socket

    from aiohttp import web

    from bridge.app import build_app
    from bridge.config import load_config
    from bridge.errors import ConfigError

    class WatchedBackend(DockerBackend):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.started: list[str] = []
            self.closed = False

        async def start(self, spec):  # type: ignore[no-untyped-def]
            self.started.append(spec.session_id)
            return await super().start(spec)

        async def close(self) -> None:
            self.closed = True
            await super().close()

    audit_file = tmp_path / "audit.jsonl"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path / "gw.toml", state_dir(), pam_service,
            ssh={"listen": f"127.0.0.1:{port}"}, session={"pool": 1}, audit={"log": str(audit_file)},
        )
        config = load_config(path, env={})
        instance = f"test-failstart-{secrets.token_hex(4)}"
        backend = WatchedBackend(config.session, instance)
        runner = web.AppRunner(build_app(config, backend=backend, web_root=ROOT / "web"), access_log=None)
        with pytest.raises(ConfigError, match="ssh.listen"):
            await runner.setup()
        await asyncio.wait_for(runner.cleanup(), 60)  # what `serve` does when a start fails
    assert backend.started, "the warm pool should have begun making a container before the door failed"
    assert backend.closed
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(audit_file) not in open_files, "the audit file is still open"
    await containers_gone(**{"termbridge.gateway": instance})


async def test_serve_releases_what_it_started_when_a_later_start_fails(gateway_process):
    """The same through `termbridge serve`: it exits with the reason and leaves no container."""
    import socket

    from bridge.config import load_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = gateway_process(ssh={"listen": f"127.0.0.1:{taken.getsockname()[1]}"}, session={"pool": 1})
        with pytest.raises(AssertionError, match="ssh.listen"):
            await process.start()
        assert await process.wait(30) != 0
    instance = (load_config(process.config_path, env={}).state_dir / "instance-id").read_text().strip()
    await containers_gone(**{"termbridge.gateway": instance})
