"""Web login bookkeeping on a real gateway with real PAM logins and real containers: expired
logins are forgotten (scripted logins do not grow memory forever), and a terminal still starting
when its login logs out does not outlive the logout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bridge.web import login as web_login
from bridge.web.keys import LOGINS
from helpers import HostUser, containers_gone, csrf_token, session_containers, wait_for

LOGINS_SCRIPTED = 20
TTL = 3  # seconds, for these tests


async def _log_in_many(gateway: Any, user: HostUser, count: int) -> None:
    for _ in range(count):
        http = await gateway.login(user)
        await http.close()  # the cookie is thrown away, as a script would


async def test_expired_logins_are_forgotten_at_the_next_login(
    start_gateway: Callable[..., Any], user: HostUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start_gateway()
    registry = gateway.app[LOGINS]
    monkeypatch.setattr(web_login, "LOGIN_TTL", TTL)
    await _log_in_many(gateway, user, LOGINS_SCRIPTED)
    assert len(registry) >= 2  # kept while valid (the first ones may have expired already)
    await asyncio.sleep(TTL + 0.5)
    await _log_in_many(gateway, user, 1)
    print(f"logins held after {LOGINS_SCRIPTED} expired ones and one fresh one: {len(registry)}")
    assert len(registry) == 1


async def test_expired_logins_are_forgotten_while_nobody_logs_in(
    start_gateway: Callable[..., Any], user: HostUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start_gateway()  # the login watch forgets expired logins every second
    registry = gateway.app[LOGINS]
    monkeypatch.setattr(web_login, "LOGIN_TTL", TTL)
    await _log_in_many(gateway, user, LOGINS_SCRIPTED)
    assert len(registry) >= 2
    await wait_for(lambda: len(registry) == 0, timeout=TTL + 5, what="expired logins to be forgotten")


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5, 1.0])
async def test_a_terminal_still_starting_at_logout_ends_with_it(
    start_gateway: Callable[..., Any], user: HostUser, delay: float
) -> None:
    gateway = await start_gateway()
    http = await gateway.login(user)
    try:
        token = await csrf_token(http, "/")
        term = await gateway.terminal(http)
        await asyncio.sleep(delay)  # the container is still being made (a start takes ~1 s or more)
        resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": gateway.origin},
                               allow_redirects=False)
        assert resp.status == 303
        started = any(c["type"] == "session" for c in term.controls)
        exit_message = await term.control("exit", timeout=60)
        print(f"logout {delay} s after opening: {'after' if started else 'before'} the session message; "
              f"exit {exit_message}")
        assert exit_message["reason"] in ("error", "killed"), exit_message
        await term.drain_until_closed()
        await containers_gone(**{"termbridge.user": user.name})
        assert not session_containers(**{"termbridge.user": user.name})
    finally:
        await http.close()
