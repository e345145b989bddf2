"""WebSocket input limits and flow control, through a real gateway, container and shell."""

from __future__ import annotations

import asyncio
import hashlib
import re

import aiohttp
import pytest
from playwright.async_api import expect

from bridge.web.keys import MANAGER
from helpers import PROMPT, wait_for
from test_browser import open_terminal_page

MEGABYTE_PASTE = b"".join(b"%05d " % i + b"x" * 93 + b"\n" for i in range(10_000))  # 1,000,000 bytes


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1]) * 1024


async def ready_shell(gateway, http):
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    return term, gateway.app[MANAGER].get(session["id"])


async def settled(read, quiet: float = 1.5, timeout: float = 60) -> int:
    """Wait until a counter stops moving (buffers full) and return its value."""
    last, since = read(), asyncio.get_running_loop().time()
    deadline = since + timeout
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.25)
        now = read()
        if now != last:
            last, since = now, asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - since >= quiet:
            return now
    raise AssertionError(f"counter never settled (last {last})")


async def test_a_megabyte_paste_reaches_the_shell_intact(gateway, user):
    assert len(MEGABYTE_PASTE) == 1_000_000
    async with await gateway.login(user) as http:
        term, _ = await ready_shell(gateway, http)
        await term.send("stty -echo; echo READY-$((1+1)); head -c 1000000 | sha256sum; stty echo\r")
        await term.expect(b"READY-2\r\n")
        await term.ws.send_bytes(MEGABYTE_PASTE)  # one frame, as a script would send it
        digest = (await term.expect(re.compile(rb"([0-9a-f]{64})  -"), timeout=60)).group(1).decode()
        assert digest == hashlib.sha256(MEGABYTE_PASTE).hexdigest()
        await term.send("exit\r")
        await term.control("exit")


async def test_a_frame_above_the_limit_closes_that_socket_only(start_gateway, user):
    gateway = await start_gateway(web={"max_message_size": "64k"}, session={"reconnect_grace": "1s"})
    async with await gateway.login(user) as http:
        term, session = await ready_shell(gateway, http)
        await term.ws.send_bytes(b"y" * (64 * 1024 + 1))
        await term.drain_until_closed()
        assert term.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await wait_for(lambda: session.ending, what="the session to end")
        again, _ = await ready_shell(gateway, http)  # the gateway serves on
        assert (await again.run("echo fine")).strip() == "fine"
        await again.send("exit\r")
        await again.control("exit")


async def test_input_is_taken_only_as_fast_as_the_shell_reads(start_gateway, user):
    """40 MB offered to a shell that reads nothing: the gateway holds a few MB at most (SSH
    window, socket buffers) and stops reading the WebSocket; nothing queues without bound."""
    gateway = await start_gateway(session={"reconnect_grace": "1s"})
    async with await gateway.login(user) as http:
        term, session = await ready_shell(gateway, http)
        await term.send("stty -echo; echo READY-$((2+2)); sleep 600\r")
        await term.expect(b"READY-4\r\n")
        before = rss_bytes()

        async def offer() -> None:
            for _ in range(40):
                await term.ws.send_bytes(MEGABYTE_PASTE)

        sending = asyncio.create_task(offer())
        taken = await settled(lambda: session.bytes_in)
        assert taken < 12_000_000, taken
        assert not sending.done()
        assert rss_bytes() - before < 64 * 1024**2
        sending.cancel()
        # the browser goes away, as a closed tab does (a close frame could never get past the
        # unread input); aiohttp's client has no public abort, so its transport is aborted
        term.ws._response.connection.transport.abort()
        # the gateway notices although it is not reading that socket: the session detaches,
        # and ends when the (here 1 s) reconnect grace is over
        await wait_for(lambda: session.ending, timeout=20, what="the session of a vanished browser to end")


async def test_output_to_a_slow_client_is_flow_controlled(gateway, user):
    """`yes` into a socket nobody reads: the gateway stops reading from the container once the
    socket is full, so its memory stays flat; output resumes when the client reads again."""
    async with await gateway.login(user) as http:
        term, session = await ready_shell(gateway, http)
        await term.send("yes\r")
        before = rss_bytes()
        sent = await settled(lambda: session.bytes_out)  # the client is not reading now
        assert sent < 32 * 1024**2, sent
        assert rss_bytes() - before < 64 * 1024**2

        received = 0
        while received < 4 * 1024**2:  # read again: the stream flows
            msg = await asyncio.wait_for(term.ws.receive(), 30)
            assert msg.type == aiohttp.WSMsgType.BINARY
            received += len(msg.data)
        assert session.bytes_out > sent
        await term.send("\x03")
        await term.send("echo stopped-$((3+3))\r")
        while True:
            msg = await asyncio.wait_for(term.ws.receive(), 30)
            if msg.type == aiohttp.WSMsgType.BINARY and b"stopped-6" in msg.data:
                break
        await term.ws.close()


@pytest.mark.browser
async def test_a_megabyte_paste_in_the_browser(browser, gateway, user):  # noqa: F811
    """Through xterm.js: the page sends the paste in pieces below the server's frame limit."""
    page = await browser.new_page()
    frames: list[int] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda p: frames.append(len(p)) if isinstance(p, bytes) else None))
    await open_terminal_page(page, gateway, user)
    await page.keyboard.type("stty -echo; echo READY-$((5+5)); head -c 1000000 | sha256sum; stty echo")
    await page.keyboard.press("Enter")
    await expect(page.locator(".xterm-rows")).to_contain_text("READY-10", timeout=15_000)
    await page.evaluate(
        """text => {
            const data = new DataTransfer();
            data.setData("text/plain", text);
            document.querySelector(".xterm-helper-textarea").dispatchEvent(
                new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
        }""",
        MEGABYTE_PASTE.decode(),
    )
    digest = hashlib.sha256(MEGABYTE_PASTE).hexdigest()
    await expect(page.locator(".xterm-rows")).to_contain_text(digest, timeout=60_000)
    assert sum(frames) >= 1_000_000 and max(frames) <= 64 * 1024, (len(frames), max(frames))
    await page.close()
