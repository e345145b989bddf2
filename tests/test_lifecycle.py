"""The gateway as a process: leftovers reaped after a SIGKILL, Docker unreachable handled."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from bridge.docker_backend import DockerBackend
from helpers import PROMPT, ROOT, containers_gone, session_containers, wait_for, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def spawn_gateway(config_path, port, env=None):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )

    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            assert proc.poll() is None, proc.stderr.read()
            return False

    await wait_for(healthy, timeout=30, what="gateway to answer /healthz")
    return proc


async def test_sigkilled_gateway_leftovers_are_reaped_on_restart(tmp_path, pam_service, docker_engine, state_dir, user):
    from conftest import Gateway

    port = free_port()
    path = write_config(tmp_path / "gw.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"})
    proc = await spawn_gateway(path, port)
    try:
        gw = Gateway(f"http://127.0.0.1:{port}", None, None)  # type: ignore[arg-type]
        async with await gw.login(user) as http:
            term = await gw.terminal(http)
            session = await term.control("session")
            await term.expect(PROMPT)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        [leftover] = session_containers(**{"termbridge.session": session["id"]})
        assert leftover.status == "running"
        proc = await spawn_gateway(path, port)
        await containers_gone(**{"termbridge.session": session["id"]})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


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
        from bridge.web_front import MANAGER

        await asyncio.wait_for(gateway.app[MANAGER].close(), 15)
        exit_msg = await term.control("exit")
        assert exit_msg["reason"] == "killed" and "shutting down" in exit_msg["message"]
    await containers_gone(**{"termbridge.session": session["id"]})
    assert os.path.isdir(gateway.config.state_dir)
    assert oct(os.stat(gateway.config.state_dir).st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("socket_closed_first", [False, True])
async def test_shutdown_while_a_container_is_being_created_leaves_nothing(gateway, user, socket_closed_first):
    """The gateway stops while a session's container is still being made (in a backend thread):
    shutdown waits for it and removes it, instead of leaving it behind."""
    from bridge.web_front import BACKEND, MANAGER

    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await asyncio.sleep(0.1)  # the container is being created now
        if socket_closed_first:
            await term.ws.close()
        await asyncio.wait_for(gateway.app[MANAGER].close(), 60)
        await gateway.app[BACKEND].close()
    await asyncio.sleep(3)  # long enough for a start that was still running to have landed
    assert not session_containers(**{"termbridge.user": user.name})
