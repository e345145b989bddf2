"""The whole path in a real browser: Debian's Chromium driven by playwright."""

from __future__ import annotations

import json

import pytest
from playwright.async_api import expect

from helpers import ARTIFACTS, containers_gone, goto, log_in, reload, screen_line, wait_for_js

pytestmark = pytest.mark.browser


async def open_terminal_page(page, gateway, user) -> None:
    """Log in, wait for the shell's prompt, focus the terminal."""
    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    await page.locator(".xterm-helper-textarea").focus()


async def test_login_type_resize_exit(browser, gateway, user):
    ARTIFACTS.mkdir(exist_ok=True)
    page = await browser.new_page(viewport={"width": 1000, "height": 600})
    resizes: list[dict] = []

    def on_socket(ws):
        ws.on("framesent", lambda payload: resizes.append(json.loads(payload))
              if isinstance(payload, str) and '"resize"' in payload else None)

    page.on("websocket", on_socket)

    await log_in(page, gateway, user, password="wrong")
    await expect(page.get_by_role("alert")).to_contain_text("Login failed")

    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    session_id = await page.locator("body").get_attribute("data-session")

    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("echo $((6*7))")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "42")).to_have_count(1, timeout=15_000)
    await page.screenshot(path=str(ARTIFACTS / "core-desktop.png"))

    await page.set_viewport_size({"width": 700, "height": 420})
    await page.wait_for_timeout(300)
    last = resizes[-1]
    await page.keyboard.type("clear; stty size")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, f"{last['rows']} {last['cols']}")).to_have_count(1, timeout=15_000)
    assert last["cols"] < 100, resizes  # the smaller window really was sent

    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(page.locator("body")).to_have_attribute("data-state", "ended", timeout=15_000)
    await expect(page.locator("#ended")).to_be_visible()
    await expect(page.locator("#ended-reason")).to_contain_text("exit")
    await page.screenshot(path=str(ARTIFACTS / "core-ended.png"))
    await containers_gone(**{"termbridge.session": session_id})

    # the ended state offers a new session, in a new container
    await page.get_by_role("button", name="Start a new session").click()
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    second = await page.locator("body").get_attribute("data-session")
    assert second and second != session_id
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(page.locator("body")).to_have_attribute("data-state", "ended", timeout=15_000)
    await page.close()
    await containers_gone(**{"termbridge.session": second})


async def test_idle_warning_banner_and_ended_state(browser, start_gateway, user):
    gateway = await start_gateway(session={"idle_timeout": "3s"})
    page = await browser.new_page()
    await log_in(page, gateway, user)
    await expect(page.locator("#banner")).to_contain_text("ends in", timeout=30_000)
    await expect(page.locator("body")).to_have_attribute("data-reason", "idle", timeout=15_000)
    await expect(page.locator("#ended-reason")).to_contain_text("idle")
    await page.close()


STATE_RECORDER = """() => {
  window.__states = [];
  new MutationObserver(() => window.__states.push(document.body.dataset.state))
    .observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
}"""


async def test_reload_resumes_and_a_blip_reconnects(browser, gateway, user):
    from bridge.web.keys import WEBSOCKETS

    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    session_id = await page.locator("body").get_attribute("data-session")
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("export TB_KEPT=survives-$((40+2))")
    await page.keyboard.press("Enter")

    await reload(page)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    assert await page.locator("body").get_attribute("data-session") == session_id
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("clear; echo $TB_KEPT")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "survives-42")).to_have_count(1, timeout=15_000)

    # A network blip: the gateway's side of the socket dies without a close handshake.
    await page.evaluate(STATE_RECORDER)
    for ws in list(gateway.app[WEBSOCKETS]):
        ws._writer.transport.abort()
    await wait_for_js(page, "window.__states.includes('reconnecting')")
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    assert await page.locator("body").get_attribute("data-session") == session_id
    await page.keyboard.type("echo again-$TB_KEPT")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "again-survives-42")).to_have_count(1, timeout=15_000)

    # A new tab is a new session.
    other = await context.new_page()
    await goto(other, gateway.url + "/")
    await expect(other.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    other_id = await other.locator("body").get_attribute("data-session")
    assert other_id != session_id
    for p in (other, page):
        await p.locator(".xterm-helper-textarea").focus()
        await p.keyboard.type("exit")
        await p.keyboard.press("Enter")
        await expect(p.locator("body")).to_have_attribute("data-state", "ended", timeout=15_000)
    await context.close()
    await containers_gone(**{"termbridge.session": session_id})
    await containers_gone(**{"termbridge.session": other_id})
