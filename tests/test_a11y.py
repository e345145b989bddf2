"""Accessible everywhere: axe-core (npm, web/node_modules) finds no violation on any page the
gateway serves, in light and in dark, with its panels and dialogs open. Debian's Chromium through playwright, against the real
gateway, PAM account and container, with the production Content-Security-Policy untouched.

Each state checked is also a screenshot: test-artifacts/a11y-<page>-<scheme>.png."""

from __future__ import annotations

import pytest
from playwright.async_api import Error as PlaywrightError, expect

from helpers import AXE, axe_check, axe_violations, containers_gone, goto, log_in

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_every_page_passes_axe(browser, gateway, user, scheme):
    context = await browser.new_context(color_scheme=scheme, viewport={"width": 1000, "height": 600})
    page = await context.new_page()

    await goto(page, gateway.url + "/login")
    await axe_check(page, f"login-{scheme}")

    await log_in(page, gateway, user, password="wrong")
    await expect(page.locator("#login-error")).to_be_visible()
    await axe_check(page, f"login-error-{scheme}")

    await log_in(page, gateway, user)
    body = page.locator("body")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(body).to_have_attribute("data-theme", scheme)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    await expect(page.locator("#status-conn")).to_have_text("connected")
    await axe_check(page, f"terminal-{scheme}")

    # the terminal page's panels: files (a file and a directory in it), search, settings
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("clear; mkdir work; echo hi > notes.txt")
    await page.keyboard.press("Enter")
    await page.get_by_role("button", name="Files").click()
    await expect(page.locator("#files").get_by_role("link", name="notes.txt")).to_be_visible(timeout=15_000)
    await axe_check(page, f"files-{scheme}")
    await page.get_by_role("button", name="Close files").click()
    await page.get_by_role("button", name="Search").click()
    await page.get_by_label("Search text").fill("no-such-text")
    await expect(page.locator("#search-count")).not_to_be_empty()
    await axe_check(page, f"search-{scheme}")
    await page.get_by_role("button", name="Close search").click()
    await page.locator("#settings summary").click()
    await expect(page.get_by_label("Copy on select")).to_be_visible()
    await axe_check(page, f"settings-{scheme}")
    await page.locator("#settings summary").click()

    await page.get_by_role("button", name="End session").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    await axe_check(page, f"confirm-end-{scheme}")
    await dialog.get_by_role("button", name="Cancel").click()

    session_id = await body.get_attribute("data-session")
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(body).to_have_attribute("data-state", "ended", timeout=15_000)
    await expect(page.get_by_role("alertdialog")).to_be_visible()
    await axe_check(page, f"ended-{scheme}")
    await containers_gone(**{"termbridge.session": session_id})
    await context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_phone_terminal_passes_axe(pw, browser, gateway, user, scheme):
    """On a phone: the narrow status bar and the extra keys, one of them (Ctrl) held down."""
    context = await browser.new_context(color_scheme=scheme, **pw.devices["Pixel 7"])
    page = await context.new_page()
    await log_in(page, gateway, user)
    body = page.locator("body")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    ctrl = page.get_by_role("toolbar", name="Extra keys").get_by_role("button", name="Ctrl")
    await ctrl.tap()
    await expect(ctrl).to_have_attribute("aria-pressed", "true")
    await axe_check(page, f"phone-{scheme}")
    session_id = await body.get_attribute("data-session")
    await page.get_by_role("button", name="End session").tap()
    await page.get_by_role("dialog").get_by_role("button", name="End session").tap()
    await expect(body).to_have_attribute("data-state", "ended", timeout=15_000)
    await axe_check(page, f"phone-ended-{scheme}")
    await containers_gone(**{"termbridge.session": session_id})
    await context.close()


async def test_axe_reports_a_contrast_violation(browser, gateway):
    """The check can fail: text made nearly invisible on the login page is reported, by rule and
    element, under the page's own Content-Security-Policy."""
    context = await browser.new_context()
    page = await context.new_page()
    await goto(page, gateway.url + "/login")
    await page.locator("#login-lead").evaluate("e => { e.style.color = '#d0d0d0'; }")
    violations = await axe_violations(page)
    assert [v["id"] for v in violations] == ["color-contrast"], violations
    assert [n["target"] for n in violations[0]["nodes"]] == [["#login-lead"]]
    # the page's CSP is the production one: it refuses the inline <script> playwright would add
    with pytest.raises(PlaywrightError, match="Content Security Policy"):
        await page.add_script_tag(path=str(AXE))
    await context.close()
