"""A login outlives nothing the admin takes away: after an account is locked, expired, given a
nologin shell, taken out of `auth.allowed_groups` or deleted, its old cookie starts no session and
its live sessions end (real gateway, real PAM accounts changed with usermod/chage/gpasswd/userdel,
real containers)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncssh
import pytest

from bridge.app import SSH_DOOR
from helpers import PROMPT, HostUser, containers_gone, session_containers
from testbed.accounts import run

REFUSED = "your account may no longer log in here"
RECHECK = 2.0  # auth.account_recheck for the tests that wait for it


@pytest.fixture
def login_group() -> Iterator[str]:
    name = "tbg" + secrets.token_hex(3)
    run("groupadd", name)
    yield name
    subprocess.run(["groupdel", name], capture_output=True)


CHANGES: dict[str, Callable[[HostUser, str], None]] = {
    "locked": lambda user, _group: run("usermod", "-L", user.name),
    "expired": lambda user, _group: run("chage", "-E", "0", user.name),
    "nologin shell": lambda user, _group: run("usermod", "-s", "/usr/sbin/nologin", user.name),
    "removed from the allowed group": lambda user, group: run("gpasswd", "-d", user.name, group),
    "deleted": lambda user, _group: run("userdel", "-f", user.name),
}


async def _gateway(start_gateway: Callable[..., Any], group: str, recheck: float) -> Any:
    return await start_gateway(auth={"allowed_groups": [group], "account_recheck": recheck})


@pytest.mark.parametrize("change", list(CHANGES))
async def test_an_old_cookie_starts_nothing_once_the_account_may_not_log_in(
    start_gateway: Callable[..., Any], make_user: Callable[..., HostUser], login_group: str, change: str
) -> None:
    gateway = await _gateway(start_gateway, login_group, recheck=3600)
    user = make_user(groups=(login_group,))
    http = await gateway.login(user)
    try:
        CHANGES[change](user, login_group)
        assert await gateway.attempt_login(user.name, user.password) == 401  # a fresh login is refused
        term = await gateway.terminal(http)
        exit_message = await term.control("exit", timeout=30)
        error = await term.control("error")
        assert REFUSED in error["message"] and REFUSED in exit_message.get("message", ""), term.controls
        assert not any(c["type"] == "session" for c in term.controls), term.controls
        assert session_containers(**{"termbridge.user": user.name}) == []
        # The login is gone with the account's right to log in: the page sends it to /login.
        resp = await http.get("/", allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/login"
    finally:
        await http.close()


@pytest.mark.parametrize("change", list(CHANGES))
async def test_live_sessions_of_an_account_that_may_not_log_in_end(
    start_gateway: Callable[..., Any], make_user: Callable[..., HostUser], login_group: str, change: str
) -> None:
    gateway = await _gateway(start_gateway, login_group, recheck=RECHECK)
    user = make_user(groups=(login_group,))
    http = await gateway.login(user)
    try:
        term = await gateway.terminal(http)
        await term.control("session", timeout=60)
        await term.expect(PROMPT)
        changed = time.monotonic()
        CHANGES[change](user, login_group)
        exit_message = await term.control("exit", timeout=RECHECK + 30)
        took = time.monotonic() - changed
        print(f"{change}: the live session ended {took:.1f} s after the change")
        assert exit_message["reason"] == "killed" and exit_message.get("message") == REFUSED, exit_message
        assert took < RECHECK + 10
        await containers_gone(**{"termbridge.user": user.name})
    finally:
        await http.close()


async def test_a_live_ssh_session_of_a_locked_account_ends(
    start_gateway: Callable[..., Any], make_user: Callable[..., HostUser]
) -> None:
    gateway = await start_gateway(ssh={"listen": "127.0.0.1:0"}, auth={"account_recheck": RECHECK})
    port = gateway.app[SSH_DOOR].port
    user = make_user()
    async with asyncssh.connect(
        "127.0.0.1", port, username=user.name, password=user.password, known_hosts=None, client_keys=None
    ) as conn:
        proc = await conn.create_process("echo ready; sleep 120")
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == "ready"
        changed = time.monotonic()
        run("usermod", "-L", user.name)
        result = await asyncio.wait_for(proc.wait(), RECHECK + 30)
        took = time.monotonic() - changed
    print(f"ssh: the live session ended {took:.1f} s after usermod -L")
    assert result.exit_status == 255 and REFUSED in result.stderr, (result.exit_status, result.stderr)
    assert took < RECHECK + 10
    await containers_gone(**{"termbridge.user": user.name})
