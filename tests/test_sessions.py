"""Session manager rules: the idle clock as a pure function, and limits through the real gateway."""

from __future__ import annotations

import asyncio
import time

from bridge.timers import IdleAction, idle_step, warn_before
from helpers import PROMPT, containers_gone


def test_warn_before_is_min_of_60s_and_a_third():
    assert warn_before(900) == 60
    assert warn_before(90) == 30
    assert warn_before(3) == 1


def test_idle_step():
    # 15 min limit, last input at t=0.
    assert idle_step(0, 100, 900, warned=False) == (IdleAction.WAIT, 740)
    assert idle_step(0, 840, 900, warned=False) == (IdleAction.WARN, 60)
    assert idle_step(0, 850, 900, warned=True) == (IdleAction.WAIT, 50)
    assert idle_step(0, 900, 900, warned=True) == (IdleAction.END, 0)
    assert idle_step(0, 1000, 900, warned=False) == (IdleAction.END, 0)
    # new input moves everything
    assert idle_step(850, 900, 900, warned=False) == (IdleAction.WAIT, 790)


async def test_idle_timeout_warns_then_ends(start_gateway, user):
    gateway = await start_gateway(session={"idle_timeout": "3s"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        assert session["idle_timeout"] == 3
        warning = await term.control("idle-warning", timeout=10)
        assert warning["seconds"] == 1
        assert await term.control("exit", timeout=10) == {
            "type": "exit", "code": None, "reason": "idle", "message": "the session was idle for too long"}
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_keystrokes_reset_the_idle_clock(start_gateway, user):
    """Typing keeps a session alive past the limit, and the idle end comes a full limit after the
    last keystroke: only a clock that each keystroke restarts does both."""
    limit = 3
    gateway = await start_gateway(session={"idle_timeout": f"{limit}s"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await term.control("session")
        await term.expect(PROMPT)
        started = time.monotonic()
        while time.monotonic() - started < limit + 1.5:  # typing, never a pause near the limit
            await term.send(" ")
            await term.expect(b" ", timeout=5)  # read as we go: a warning or an end would show
            await asyncio.sleep(0.4)
        await term.send("\x15")  # clear the line
        assert (await term.run("echo alive")).strip() == "alive"
        last_keystroke = time.monotonic()
        assert [m["type"] for m in term.controls] == ["session"], term.controls
        exit_msg = await term.control("exit", timeout=limit + 10)
        idle_for = time.monotonic() - last_keystroke
        assert exit_msg["reason"] == "idle"
        assert limit - 0.5 <= idle_for <= limit + 2, idle_for
        assert [m["type"] for m in term.controls] == ["session", "idle-warning", "exit"], term.controls


async def test_max_lifetime_ends_a_busy_session(start_gateway, user):
    gateway = await start_gateway(session={"max_lifetime": "3s"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        for _ in range(4):
            await term.send(" ")
            await asyncio.sleep(0.5)
        exit_msg = await term.control("exit", timeout=10)
        assert exit_msg["reason"] == "lifetime" and exit_msg["code"] is None
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_per_user_cap_refuses_with_a_reason(start_gateway, user):
    gateway = await start_gateway(session={"max_per_user": 1})
    async with await gateway.login(user) as http:
        first = await gateway.terminal(http)
        await first.control("session")
        second = await gateway.terminal(http)
        error = await second.control("error")
        assert "session.max_per_user" in error["message"]
        assert (await second.control("exit"))["reason"] == "error"
        await first.send("exit\r")
        await first.control("exit")
