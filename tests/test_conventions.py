"""The command line's and the service's conventions, through real `termbridge` processes:
--version, --config on either side of the subcommand, the JSON log and the access log of a
serving gateway, systemd readiness over a real notify socket, and the pre-start check with
Docker unreachable."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp

from bridge import logsafe

from helpers import PROMPT, ROOT, Gateway, containers_gone, find_secrets, free_port, stop_process, wait_for, write_config

TERMBRIDGE = [sys.executable, "-m", "bridge"]


def termbridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TERMBRIDGE, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_version_prints_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = termbridge("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"termbridge {version}"


def test_config_is_accepted_before_and_after_the_subcommand(tmp_path, pam_service, state_dir):
    # a config the defaults would not pass: its ports are taken, so both spellings must read it
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"})
        before, after = termbridge("--config", str(config), "check"), termbridge("check", "--config", str(config))
    for proc in (before, after):
        assert f"ok   config: {config} is valid" in proc.stdout, proc.stdout
        assert f"FAIL web.listen: 127.0.0.1:{port} is in use" in proc.stdout
    assert before.stdout == after.stdout
    bad = termbridge("--config", str(tmp_path / "missing.toml"), "serve")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_pre_start_check_passes_while_docker_is_down(tmp_path, pam_service, state_dir):
    """The unit's ExecStartPre: Docker down is a warning (the gateway copes), not a failed start;
    without --pre-start it stays a failure."""
    config = write_config(tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{free_port()}"})
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))  # a socket file nobody listens on: connections are refused
        env = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{dead}"}
        pre = termbridge("check", "--pre-start", "--config", str(config), env=env)
        plain = termbridge("check", "--config", str(config), env=env)
    assert pre.returncode == 0, pre.stdout
    assert any(line.startswith("warn docker: the engine cannot be reached") for line in pre.stdout.splitlines())
    assert "ready to serve" in pre.stdout
    assert plain.returncode == 1 and "FAIL docker: the engine cannot be reached" in plain.stdout


class NotifySocket:
    """The service manager's side of $NOTIFY_SOCKET: a unix datagram socket this test binds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def receive(self, timeout: float = 60) -> str:
        loop = asyncio.get_running_loop()
        return (await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)).decode()

    def close(self) -> None:
        self.sock.close()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_serve_notifies_systemd_logs_json_and_access_lines(tmp_path, pam_service, state_dir, user):
    """READY=1 only once both doors accept connections, STOPPING=1 on SIGTERM; with
    log.format = "json" every line parses, session lines carry session and user as fields, the
    access log has one line per request without its query string, and no password anywhere."""
    web_port, ssh_port = free_port(), free_port()
    config = write_config(
        tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{web_port}"},
        ssh={"listen": f"127.0.0.1:{ssh_port}"}, log={"format": "json", "access": True},
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*TERMBRIDGE, "serve", "--config", str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=log, env={**_env(), "NOTIFY_SOCKET": str(notify.path)})
    try:
        ready = await notify.receive()
        assert ready == "READY=1", ready
        assert accepts(web_port) and accepts(ssh_port)
        url = f"http://127.0.0.1:{web_port}"
        gateway = Gateway(url, None, None, config)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz?token=hunter2secret") as resp:
            assert resp.status == 200
        async with await gateway.login(user) as http:
            term = await gateway.terminal(http)
            session = await term.control("session")
            await term.expect(PROMPT)
            await term.send("exit\r")
            await term.control("exit")
        await containers_gone(**{"termbridge.session": session["id"]})
        proc.send_signal(signal.SIGTERM)
        assert await notify.receive(timeout=30) == "STOPPING=1"
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            stop_process(proc)
        notify.close()
    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    about_session = [e for e in entries if f"[session={session['id'][:12]}" in e["message"]]
    assert about_session and all(e["session"] == session["id"][:12] and e["user"] == user.name for e in about_session)
    access = [e["message"] for e in entries if e["logger"] == "termbridge.access"]
    assert any('"GET /healthz" 200' in line for line in access), access
    assert any('"POST /login"' in line for line in access), access
    assert not any("hunter2secret" in line for line in lines)
    assert not find_secrets(lines, [user.password])


async def test_a_gateway_started_while_docker_is_down_is_ready_and_says_so(tmp_path, pam_service, state_dir):
    """What lets the pre-start check pass with Docker down: the gateway itself starts, tells
    systemd it is ready and serves its pages; /healthz says Docker is unreachable."""
    port = free_port()
    config = write_config(tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"})
    notify = NotifySocket(tmp_path / "notify.sock")
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock, open(tmp_path / "gateway.log", "wb") as log:
        sock.bind(str(dead))
        proc = subprocess.Popen([*TERMBRIDGE, "serve", "--config", str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=log, env={**_env(), "NOTIFY_SOCKET": str(notify.path), "DOCKER_HOST": f"unix://{dead}"})
        try:
            assert await notify.receive() == "READY=1"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:  # serving, and honest about Docker
                    assert (resp.status, await resp.text()) == (503, "docker unreachable\n")
                async with http.get(f"http://127.0.0.1:{port}/login") as resp:
                    assert resp.status == 200
        finally:
            stop_process(proc)
            notify.close()
    assert proc.returncode == 0
    assert "Docker unreachable at start" in (tmp_path / "gateway.log").read_text()


# What HTTP lets through to a header (the parser refuses ASCII controls) and a log must still
# not show raw: a bidi override, a line separator, a C1 control.
EVIL_AGENT = "agent\u202eevil\u2028\x85"


async def raw_get(port: int, path: str) -> int:
    """GET with EVIL_AGENT as User-Agent, sent as bytes (aiohttp's client refuses such headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {EVIL_AGENT}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1])


async def serve_three_requests(tmp_path: Path, config: Path, port: int) -> str:
    """Start `termbridge serve`, ask /healthz three times with EVIL_AGENT, stop it; what it logged."""
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*TERMBRIDGE, "serve", "--config", str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=log, env=_env())
    try:
        await wait_for(lambda: asyncio.to_thread(accepts, port), timeout=30, what="gateway to listen")
        for _ in range(3):
            assert await raw_get(port, "/healthz?key=hunter2secret") == 200
    finally:
        stop_process(proc)
    return log_path.read_text()


async def test_no_access_log_unless_asked(tmp_path, pam_service, state_dir):
    port = free_port()
    config = write_config(tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"})
    text = await serve_three_requests(tmp_path, config, port)
    assert "Running on" in text and "termbridge.access" not in text and "/healthz" not in text
    assert not text.lstrip().startswith("{")  # text is the default format


async def test_text_access_log_escapes_what_clients_send(tmp_path, pam_service, state_dir):
    port = free_port()
    config = write_config(tmp_path / "c.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"},
                          log={"access": True})
    text = await serve_three_requests(tmp_path, config, port)
    access = [line for line in text.splitlines() if " termbridge.access: " in line]
    assert len(access) == 3, text
    for line in access:
        assert re.search(r' termbridge\.access: 127\.0\.0\.1 "GET /healthz" 200 \d+ \d+\.\d{3}s "agent\\u202eevil\\u2028\\x85"$', line), line
    assert "hunter2secret" not in text and "\u202e" not in text and "\u2028" not in text and "\x85" not in text


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


FORGERY = 'x\n{"ts": "forged"}\x1b[2J\u2028\x85\u202e'


def test_json_log_lines_cannot_be_forged():
    """A message full of controls stays one JSON line with nothing a terminal would act on."""
    record = logging.LogRecord("termbridge.web", logging.WARNING, __file__, 1, "bad name %s", (FORGERY,), None)
    record.session, record.user = "abc", "eve\r\n"
    line = logsafe.JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and all(32 <= ord(c) < 127 for c in line)
    entry = json.loads(line)
    assert entry["message"] == f"bad name {FORGERY}" and entry["user"] == "eve\r\n"
    assert entry["level"] == "WARNING" and entry["logger"] == "termbridge.web" and entry["session"] == "abc"
