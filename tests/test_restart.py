"""Sessions outlive the gateway: real `termbridge serve` processes are killed (SIGKILL), stopped
(SIGTERM with on_shutdown = keep) and started again while a web session runs a counter loop in a
real container; a WebSocket client comes back with its offset and must see the counter go on,
every line exactly once, including what was printed while no gateway ran."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import statistics
import time

import aiohttp
import pytest

from helpers import (
    PROMPT, Terminal, containers_gone, free_port, log_in, screen_line, session_containers, wait_for,
)
from test_audit import ssh_client

COUNTER = "i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.1; done\r"
TICK = re.compile(rb"tick (\d+)\r\n")


def ticks(data: bytes) -> list[int]:
    return [int(m) for m in TICK.findall(data)]


async def reattach(gw, http: aiohttp.ClientSession, session_id: str, offset: int) -> Terminal:
    ws = await http.ws_connect(f"/ws?session={session_id}&offset={offset}", headers={"Origin": gw.origin}, max_msg_size=0)
    term = Terminal(ws)
    await term.resize(80, 24)
    return term


async def start_counter(gw, http: aiohttp.ClientSession) -> tuple[Terminal, str]:
    term = await gw.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    await term.send(COUNTER)
    await term.expect(b"tick 5\r\n")
    return term, session["id"]


async def still_logged_in(gw, http: aiohttp.ClientSession, user) -> aiohttp.ClientSession:
    """The page's login after the restart: the same cookie where logins live in the store, else
    a new login of the same person (session ownership is the person's, not the cookie's)."""
    async with http.get("/", allow_redirects=False) as resp:
        if resp.status == 200:
            return http
    return await gw.login(user)


async def comes_back(gw, http, session_id: str, offset: int, timeout: float = 20) -> tuple[Terminal, float]:
    """Reattach as the page does (retrying while the gateway is not up yet); the new terminal and
    the seconds from the gateway answering to the `session` message."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            began = time.monotonic()
            term = await reattach(gw, http, session_id, offset)
            await term.control("session", timeout=15)
            return term, time.monotonic() - began
        except (aiohttp.ClientError, AssertionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def check_continued(before: Terminal, after: Terminal, session_id: str, offset: int) -> list[int]:
    """`after` resumed exactly at `offset`: the ticks before and after join without a hole or a
    repeat, and the loop was not restarted."""
    session = await after.control("session")
    assert session["id"] == session_id and session["offset"] == offset
    assert not [c for c in after.controls if c.get("type") == "gap"]
    last = ticks(bytes(before.transcript[:offset]))[-1]
    await after.expect(f"tick {last + 30}\r\n".encode(), timeout=20)
    seen = ticks(bytes(before.transcript[:offset]) + bytes(after.transcript))
    assert seen == list(range(1, len(seen) + 1)), seen
    return seen


async def stop_counter(term: Terminal, session_id: str) -> None:
    await term.send("\x03exit\r")
    exit_msg = await term.control("exit", timeout=20)
    assert exit_msg["reason"] == "exit"
    await containers_gone(**{"termbridge.session": session_id})


async def restart_and_continue(process, first, user, term: Terminal, session_id: str, offset: int) -> list[int]:
    """The container ran on without a gateway; start the gateway again and come back."""
    [container] = session_containers(**{"termbridge.session": session_id})
    assert container.status == "running"
    await process.start()
    async with await still_logged_in(process.gateway, first, user) as http:
        after, _ = await comes_back(process.gateway, http, session_id, offset)
        seen = await check_continued(term, after, session_id, offset)
        await stop_counter(after, session_id)
    return seen


@contextlib.asynccontextmanager
async def counting(gateway_process, user, **sections):
    """A gateway process and one web session of `user` running the counter loop in it."""
    process = gateway_process(**{**sections, "session": {"on_shutdown": "keep", **sections.get("session", {})}})
    await process.start()
    async with await process.gateway.login(user) as http:
        term, session_id = await start_counter(process.gateway, http)
        yield process, http, term, session_id


async def test_sigkill_output_while_down_is_replayed_exactly(gateway_process, user):
    async with counting(gateway_process, user) as (process, first, term, session_id):
        offset = term.received
        process.signal(signal.SIGKILL)
        await process.wait(10)
        await asyncio.sleep(2)  # ~20 ticks printed with no gateway running
        seen = await restart_and_continue(process, first, user, term, session_id, offset)
        assert len(seen) > ticks(bytes(term.transcript[:offset]))[-1] + 20


async def test_sigterm_keep_tells_the_page_and_the_session_runs_on(gateway_process, user, tmp_path):
    """Also: an SSH-door session ends at the stop either way (its connection is the gateway's),
    and its container goes."""
    port = free_port()
    async with counting(gateway_process, user, ssh={"listen": f"127.0.0.1:{port}"}) as (process, first, term, session_id):
        ssh = asyncio.create_task(ssh_client(port, user, "sleep 600", known_hosts=tmp_path / "kh"))
        await wait_for(lambda: session_containers(**{"termbridge.door": "ssh", "termbridge.user": user.name}),
                       timeout=30, what="the SSH-door session's container")
        process.signal(signal.SIGTERM)
        await term.control("restarting", timeout=10)
        await term.drain_until_closed(timeout=10)
        assert term.close_code == 1012
        assert not [c for c in term.controls if c.get("type") == "exit"]
        assert await process.wait(10) == 0
        assert (await asyncio.wait_for(ssh, 10))[0] != 0
        assert not session_containers(**{"termbridge.door": "ssh", "termbridge.user": user.name})
        await restart_and_continue(process, first, user, term, session_id, term.received)


async def test_sigterm_end_ends_web_sessions(gateway_process, user):
    async with counting(gateway_process, user, session={"on_shutdown": "end"}) as (process, _, term, session_id):
        process.signal(signal.SIGTERM)
        exit_msg = await term.control("exit", timeout=10)
        assert exit_msg["reason"] == "killed"
        assert await process.wait(10) == 0
    assert not session_containers(**{"termbridge.session": session_id})


async def test_container_ends_itself_with_no_gateway(gateway_process, user):
    """idle_timeout with no gateway attached is enforced inside the container; the next gateway
    forgets the session and removes what is left."""
    process = gateway_process(session={"idle_timeout": "5s", "on_shutdown": "keep"})
    await process.start()
    gw = process.gateway
    async with await gw.login(user) as http:
        term = await gw.terminal(http)
        session_id = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        process.signal(signal.SIGKILL)
        await process.wait(10)
    began = time.monotonic()

    def stopped() -> bool:
        return all(c.status != "running" for c in session_containers(**{"termbridge.session": session_id}))

    await wait_for(stopped, timeout=20, interval=0.5, what="the session container to end itself")
    assert time.monotonic() - began < 15
    await process.start()
    await containers_gone(**{"termbridge.session": session_id})
    assert f"session {session_id[:12]}" in process.log()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_reconnect_time_after_restart(gateway_process, make_user, sig):
    """Several sessions come back after one restart; the time from the gateway answering to each
    session's `session` message is printed (median, worst) and must stay within a few seconds."""
    process = gateway_process(session={"on_shutdown": "keep"})
    await process.start()
    gw = process.gateway
    users = [make_user() for _ in range(6)]
    https = [await gw.login(u) for u in users]
    try:
        running = [await start_counter(gw, http) for http in https]
        offsets = [term.received for term, _ in running]
        process.signal(sig)
        await process.wait(10)
        down = time.monotonic()
        await process.start()
        print(f"gateway answering {time.monotonic() - down:.2f} s after it was started again")
        https = [await still_logged_in(gw, http, u) for http, u in zip(https, users)]
        back = await asyncio.gather(
            *(comes_back(gw, http, sid, off) for http, (_, sid), off in zip(https, running, offsets))
        )
        times = [t for _, t in back]
        print(f"reconnect after {sig.name}: median {statistics.median(times) * 1000:.0f} ms, "
              f"worst {max(times) * 1000:.0f} ms over {len(times)} sessions")
        assert max(times) < 5
        for (term, sid), off, (after, _) in zip(running, offsets, back):
            await check_continued(term, after, sid, off)
            await stop_counter(after, sid)
    finally:
        for http in https:
            await http.close()


async def test_a_second_window_on_another_gateway_takes_over(gateway_process, user, make_user, redis_url, tmp_path):
    """Two gateway processes sharing one Redis store: a window on the second attaches to a
    session the first serves; the first window is told (4001) and the counter goes on in the
    second, joined exactly. Someone else naming the session id gets a session of their own."""
    store = {"url": redis_url, "secret_file": str(tmp_path / "store-key")}
    async with counting(gateway_process, user, store=store) as (first, _, term, session_id):
        second = gateway_process(store=store, session={"on_shutdown": "keep"})
        await second.start()
        offset = term.received
        async with await second.gateway.login(user) as http:
            after, _ = await comes_back(second.gateway, http, session_id, offset)
            await term.drain_until_closed(timeout=10)
            assert term.close_code == 4001
            await check_continued(term, after, session_id, offset)
            async with await second.gateway.login(make_user()) as other:
                stranger = await reattach(second.gateway, other, session_id, 0)
                assert (await stranger.control("session"))["id"] != session_id
                await stranger.send("exit\r")
                await stranger.control("exit")
            assert "belongs to" in second.log()
            await stop_counter(after, session_id)
        assert "another gateway took this session over" in first.log()


def visible_ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)\s*$", text, re.M)]


@pytest.mark.browser
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
async def test_the_browser_comes_back_by_itself(browser, gateway_process, user, sig):
    """Chromium: the gateway is killed (or stopped) and started again while the page's session
    runs a counter loop; the page shows "reconnecting…", comes back by itself to the same
    session, and the counter went on (no restart of the loop, nothing missing on screen).
    SIGHUP reloads the config in place: the page does not even notice."""
    from playwright.async_api import expect

    process = gateway_process(session={"on_shutdown": "keep"})
    await process.start()
    page = await browser.new_page(viewport={"width": 900, "height": 700})
    await log_in(page, process.gateway, user)
    body = page.locator("body")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    session_id = await body.get_attribute("data-session")
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type(COUNTER.replace("sleep 0.1", "sleep 0.2").rstrip("\r"))
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "tick 5")).to_have_count(1, timeout=15_000)

    process.signal(sig)
    if sig == signal.SIGHUP:
        await wait_for(lambda: "reload" in process.log(), timeout=10, what="the reload")
        before = max(visible_ticks(await page.locator(".xterm-rows").inner_text()))
    else:
        await process.wait(10)
        await expect(body).to_have_attribute("data-state", "reconnecting", timeout=10_000)
        if sig == signal.SIGTERM:
            await expect(page.locator("#banner")).to_contain_text("restarting", timeout=5_000)
        before = max(visible_ticks(await page.locator(".xterm-rows").inner_text()))
        await asyncio.sleep(2)
        await process.start()
        began = time.monotonic()
        await expect(body).to_have_attribute("data-state", "running", timeout=15_000)
        print(f"browser back {time.monotonic() - began:.2f} s after the gateway answered ({sig.name})")
    assert await body.get_attribute("data-session") == session_id
    await expect(screen_line(page, f"tick {before + 25}")).to_have_count(1, timeout=20_000)
    # Consecutive across the restart (the screen holds ticks from before it): nothing lost or
    # doubled, and the loop was not started again (that would show a second "tick 1").
    shown = visible_ticks(await page.locator(".xterm-rows").inner_text())
    assert shown[0] <= before and shown == list(range(shown[0], shown[0] + len(shown))), shown
    await page.keyboard.press("Control+C")
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(body).to_have_attribute("data-state", "ended", timeout=15_000)
    await containers_gone(**{"termbridge.session": session_id})
    await page.close()


async def test_idle_clock_goes_on_across_a_restart(gateway_process, user):
    """The adopted session's idle clock continues from the store's, not from the reattach."""
    process = gateway_process(session={"idle_timeout": "10s", "on_shutdown": "keep"})
    await process.start()
    async with await process.gateway.login(user) as first:
        term = await process.gateway.terminal(first)
        session_id = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        ready = time.monotonic()
        process.signal(signal.SIGKILL)
        await process.wait(10)
        await process.start()
        await asyncio.sleep(max(0.0, 4 - (time.monotonic() - ready)))
        async with await still_logged_in(process.gateway, first, user) as http:
            after, _ = await comes_back(process.gateway, http, session_id, term.received)
            exit_msg = await after.control("exit", timeout=20)
            ended = time.monotonic() - ready
    assert exit_msg["reason"] == "idle"
    assert 8 < ended < 12.5, ended  # 10 s after the last activity, not 10 s after the reattach (14 s)
    await containers_gone(**{"termbridge.session": session_id})
