"""The terminal page beyond typing: clipboard, links, search, files, status bar, looks, phones,
accessibility. Debian's Chromium through playwright, against the real gateway and containers.

Screenshots of the main states go to test-artifacts/ (ux-desktop-light.png, ux-desktop-dark.png,
ux-mobile.png, ux-ended.png, plus ux-files.png, ux-search.png and ux-dropzone.png)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets

import pytest
from playwright.async_api import expect

from bridge.web.keys import WEBSOCKETS
from helpers import (
    ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, containers_gone, goto, log_in, reload, screen_line, wait_for,
    wait_for_js,
)

pytestmark = pytest.mark.browser
ARTIFACTS.mkdir(exist_ok=True)

CLIPBOARD = ["clipboard-read", "clipboard-write"]


async def open_terminal(browser, gateway, user, sent: list | None = None, **context_options):
    """A logged-in terminal page; binary frames the page sends are appended to `sent`."""
    context = await browser.new_context(**context_options)
    page = await context.new_page()
    if sent is not None:
        page.on("websocket", lambda ws: ws.on("framesent", lambda data: sent.append(data) if isinstance(data, bytes) else None))
    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    return context, page


async def run(page, command: str) -> None:
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type(command)
    await page.keyboard.press("Enter")


async def run_to_end(page, command: str) -> None:
    """Run `command` and wait until it has finished (it prints nothing itself)."""
    marker = f"done-{secrets.token_hex(4)}"
    await run(page, f"{command}; echo {marker}")
    await expect(screen_line(page, marker)).to_have_count(1, timeout=15_000)


async def exit_and_gone(page) -> None:
    session_id = await page.locator("body").get_attribute("data-session")
    await run(page, "exit")
    await expect(page.locator("body")).to_have_attribute("data-state", "ended", timeout=15_000)
    await containers_gone(**{"termbridge.session": session_id})


async def point_at(page, row, x: float = 10):
    """Screen coordinates of column-ish `x` pixels into a terminal row (xterm's screen layer
    takes the pointer events, so rows are aimed at by position, as a person's mouse would)."""
    box = await row.bounding_box()
    return box["x"] + x, box["y"] + box["height"] / 2


async def clipboard_text(page) -> str:
    return await page.evaluate("navigator.clipboard.readText()")


async def eventually(read, expected, what: str) -> None:
    """Wait until `await read()` equals `expected` (for values no locator assertion covers)."""
    seen = []

    async def check() -> bool:
        seen.append(await read())
        return seen[-1] == expected

    try:
        await wait_for(check, timeout=15, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: wanted {expected!r}, last saw {seen[-1:]!r}") from None


async def print_select_and_copy(page, echo: str, shown: str, copy_key: str) -> None:
    """`echo` a word, select its output with a double click, copy it with `copy_key`."""
    await run(page, f"clear; echo {echo}")
    line = screen_line(page, shown)
    await expect(line).to_have_count(1, timeout=15_000)
    await page.mouse.dblclick(*await point_at(page, line))
    await page.keyboard.press(copy_key)
    await eventually(lambda: clipboard_text(page), shown, "the clipboard")


async def test_clipboard_copy_paste_bracketed_and_large(browser, gateway, user):
    sent: list[bytes] = []
    context, page = await open_terminal(browser, gateway, user, sent, permissions=CLIPBOARD)

    # copy a command's output (select it with a double click, Ctrl+Shift+C) and paste it back
    await print_select_and_copy(page, "copy-me-$((40+2))", "copy-me-42", "Control+Shift+C")
    await page.keyboard.type("echo again-")
    await page.keyboard.press("Control+Shift+V")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "again-copy-me-42")).to_have_count(1, timeout=15_000)

    # right-click pastes too; Ctrl+Shift+C never reached the shell as ^C
    await page.keyboard.type("echo right-")
    await page.locator("#terminal").click(button="right")
    await expect(page.locator(".xterm-rows")).to_contain_text("echo right-copy-me-42")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "right-copy-me-42")).to_have_count(1, timeout=15_000)

    # copy on select, once switched on in the settings
    await page.locator("#settings summary").click()
    await page.get_by_label("Copy on select").check()
    await page.locator("#settings summary").click()
    await run(page, "echo selected-$((6*7))")
    line = screen_line(page, "selected-42")
    await expect(line).to_have_count(1, timeout=15_000)
    await page.mouse.dblclick(*await point_at(page, line))
    await eventually(lambda: clipboard_text(page), "selected-42", "the clipboard")
    assert await page.evaluate("JSON.parse(localStorage.getItem('termbridge.prefs')).copyOnSelect") is True

    # bracketed paste passes through when the program asks for it
    await page.evaluate("navigator.clipboard.writeText('pasted-text')")
    await run(page, "clear; stty -echo; printf '\\033[?2004h'; echo ready-$((2+1)); cat -v; stty echo")
    await expect(screen_line(page, "ready-3")).to_have_count(1, timeout=15_000)
    await page.keyboard.press("Control+Shift+V")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, re.escape("^[[200~pasted-text^[[201~"))).to_have_count(1, timeout=15_000)
    await page.keyboard.press("Control+D")

    # a 200 KB paste arrives intact: 2048 lines of 99 characters and a newline
    lines = [f"{i:05d} " + "abcdefghijklmnopqrstuvwxyz0123456789"[i % 36] * 93 for i in range(2048)]
    text = "\n".join(lines) + "\n"
    assert len(text) == 204800
    await page.evaluate("(t) => navigator.clipboard.writeText(t)", text)
    await run(page, "clear; echo ready-$((1+1)); tee ~/paste.txt | wc -c")
    # (bash switches bracketed paste off for the command it runs: paste once that has arrived)
    await expect(screen_line(page, "ready-2")).to_have_count(1, timeout=15_000)
    sent.clear()
    await page.keyboard.press("Control+Shift+V")
    await page.keyboard.press("Control+D")
    await expect(screen_line(page, "204800"), "wc -c counted every byte").to_have_count(1, timeout=60_000)
    # it went in frames of at most 16 KiB, not as one 200 KB message
    assert sum(map(len, sent)) == 204800 + 1 and max(map(len, sent)) <= 16384 and len(sent) >= 13, list(map(len, sent))
    digest = hashlib.sha256(text.encode()).hexdigest()
    await run(page, "clear; sha256sum ~/paste.txt")
    await expect(screen_line(page, f"{digest} .*paste.txt")).to_have_count(1, timeout=15_000)

    await exit_and_gone(page)
    await context.close()


async def test_links_search_title_and_font_size(browser, gateway, user):
    context, page = await open_terminal(browser, gateway, user, viewport={"width": 1100, "height": 640})
    url = f"{gateway.url}/healthz"

    # a URL in the output is a link that opens a new tab without an opener
    await run(page, f"clear; echo {url}")
    line = screen_line(page, re.escape(url))
    await expect(line).to_have_count(1, timeout=15_000)
    await page.mouse.move(*await point_at(page, line, 40))
    await expect(page.locator(".xterm-screen")).to_have_class(re.compile("xterm-cursor-pointer"))
    async with context.expect_page() as new_page:
        await page.mouse.click(*await point_at(page, line, 40))
    opened = await new_page.value
    await opened.wait_for_load_state()
    assert opened.url == url
    assert await opened.evaluate("window.opener") is None
    await opened.close()

    # search finds a string that scrolled out of view
    await run(page, "echo needle-$((6*7)); seq 1 3000")
    await expect(screen_line(page, "3000")).to_have_count(1, timeout=15_000)
    await expect(screen_line(page, "needle-42")).to_have_count(0)
    await page.keyboard.press("Control+Shift+F")
    search = page.get_by_label("Search text")
    await expect(search).to_be_focused()
    await search.fill("needle-42")
    await search.press("Enter")
    await expect(page.locator("#search-count")).to_have_text("1 of 1")
    await expect(screen_line(page, "needle-42")).to_have_count(1)
    await page.screenshot(path=str(ARTIFACTS / "ux-search.png"))
    await search.fill("no-such-thing-here")
    await expect(page.locator("#search-count")).to_have_text("no matches")
    await search.press("Escape")
    await expect(page.locator("#search")).to_be_hidden()

    # the terminal title (OSC 0 and OSC 2) is the page title
    await run(page, "PROMPT_COMMAND=; PS1='$ '; printf '\\033]2;build log - tb\\007'")
    await expect(page).to_have_title("build log - tb")
    await run(page, "printf '\\033]0;icon and title\\007'")
    await expect(page).to_have_title("icon and title")

    # font size: Ctrl+= and Ctrl+- change it, the terminal refits, and it is remembered
    rows = page.locator(".xterm-rows")
    assert await rows.evaluate("e => getComputedStyle(e).fontSize") == "14px"
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.press("Control+Equal")
    await page.keyboard.press("Control+Equal")
    await page.keyboard.press("Control+Minus")
    await expect(page.locator("#font-size")).to_have_text("15")
    await eventually(lambda: rows.evaluate("e => getComputedStyle(e).fontSize"), "15px", "the font size")
    await reload(page)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator("#font-size")).to_have_text("15")
    assert await page.locator(".xterm-rows").evaluate("e => getComputedStyle(e).fontSize") == "15px"
    await exit_and_gone(page)
    await context.close()


async def test_macos_uses_cmd_for_the_terminals_shortcuts(browser, gateway, user):
    """On a Mac (as the page sees navigator.platform), Cmd+C copies, Cmd+F searches and Cmd+=
    grows the font, while Ctrl+C still interrupts."""
    context = await browser.new_context(permissions=CLIPBOARD)
    await context.add_init_script("Object.defineProperty(Navigator.prototype, 'platform', {get: () => 'MacIntel'})")
    page = await context.new_page()
    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await print_select_and_copy(page, "mac-$((6*7))", "mac-42", "Meta+C")
    await page.keyboard.press("Meta+F")
    await expect(page.get_by_label("Search text")).to_be_focused()
    await expect(page.get_by_label("Search text")).to_have_value("mac-42")  # the selection
    await page.keyboard.press("Escape")
    await page.keyboard.press("Meta+Equal")
    await expect(page.locator("#font-size")).to_have_text("15")
    await run(page, "sleep 300")
    await page.keyboard.press("Control+C")
    await expect(page.locator(".xterm-rows")).to_contain_text("^C", timeout=15_000)
    await exit_and_gone(page)
    await context.close()


async def test_unicode11_widths(browser, gateway, user):
    """With the unicode11 addon an emoji takes two cells, as in the container's own wcwidth: the
    terminal's cursor report (DSR) after one emoji says column 3."""
    context, page = await open_terminal(browser, gateway, user)
    await run(page, "clear; printf '\\360\\237\\230\\200\\033[6n'; read -s -d R pos; echo; echo col=${pos#*;}")
    await expect(screen_line(page, "col=3")).to_have_count(1, timeout=15_000)
    await exit_and_gone(page)
    await context.close()


async def _upload_state(page, name: str):
    return page.locator(f'#uploads li[data-name="{name}"]')


async def test_upload_by_drop_and_button_then_download(browser, gateway, user, tmp_path):
    context, page = await open_terminal(browser, gateway, user, accept_downloads=True)

    # the Upload button: a 5 MB file from disk
    button_data = os.urandom(5 * 1024 * 1024)
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Upload").click()
    await (await chooser.value).set_files([{"name": "button.bin", "mimeType": "application/octet-stream", "buffer": button_data}])
    row = await _upload_state(page, "button.bin")
    await expect(row).to_have_attribute("data-status", "done", timeout=60_000)
    await expect(row).to_contain_text("uploaded to ~/button.bin")
    assert await row.locator("progress").evaluate("p => p.value") == 1
    await run(page, "clear; sha256sum button.bin")
    await expect(screen_line(page, f"{hashlib.sha256(button_data).hexdigest()}  button.bin")).to_have_count(1, timeout=15_000)

    # drag and drop onto the terminal: a 5 MB file made in the page
    digest = await page.evaluate(
        """async () => {
            const bytes = new Uint8Array(5 * 1024 * 1024);
            for (let i = 0; i < bytes.length; i += 65536) crypto.getRandomValues(bytes.subarray(i, i + 65536));
            window.__dropped = new File([bytes], "dropped.bin", {type: "application/octet-stream"});
            const hash = await crypto.subtle.digest("SHA-256", bytes);
            return [...new Uint8Array(hash)].map(b => b.toString(16).padStart(2, "0")).join("");
        }"""
    )
    transfer = await page.evaluate_handle("() => { const dt = new DataTransfer(); dt.items.add(window.__dropped); return dt; }")
    await page.locator("#terminal").dispatch_event("dragenter", {"dataTransfer": transfer})
    await expect(page.locator("#dropzone")).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "ux-dropzone.png"))
    await page.locator("#terminal").dispatch_event("drop", {"dataTransfer": transfer})
    await expect(page.locator("#dropzone")).to_be_hidden()
    row = await _upload_state(page, "dropped.bin")
    await expect(row.locator("progress")).to_be_visible()
    await expect(row).to_have_attribute("data-status", "done", timeout=60_000)
    await run(page, "clear; sha256sum dropped.bin")
    await expect(screen_line(page, f"{digest}  dropped.bin")).to_have_count(1, timeout=15_000)

    # the Files panel lists the home directory; one click downloads
    await page.get_by_role("button", name="Files").click()
    panel = page.locator("#files")
    await expect(panel).to_be_visible()
    await expect(panel.get_by_role("link", name="dropped.bin")).to_be_visible()
    await expect(panel.get_by_role("link", name="button.bin")).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "ux-files.png"))
    async with page.expect_download() as download_info:
        await panel.get_by_role("link", name="dropped.bin").click()
    download = await download_info.value
    assert download.suggested_filename == "dropped.bin"
    saved = tmp_path / "dropped.bin"
    await download.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == digest
    async with page.expect_download() as download_info:
        await panel.get_by_role("link", name="button.bin").click()
    await (await download_info.value).save_as(tmp_path / "button.bin")
    assert (tmp_path / "button.bin").read_bytes() == button_data

    # directories open in the panel; an upload goes to the directory shown
    await run_to_end(page, "mkdir -p ~/inbox")
    await panel.get_by_role("button", name="Refresh").click()
    await panel.get_by_role("button", name="inbox/").click()
    await expect(page.locator("#files-path")).to_have_text("~/inbox")
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Upload").click()
    await (await chooser.value).set_files([{"name": "note.txt", "mimeType": "text/plain", "buffer": b"hello inbox\n"}])
    await expect(await _upload_state(page, "note.txt")).to_have_attribute("data-status", "done", timeout=30_000)
    await expect(panel.get_by_role("link", name="note.txt")).to_be_visible()
    await run(page, "clear; cat ~/inbox/note.txt")
    await expect(screen_line(page, "hello inbox")).to_have_count(1, timeout=15_000)
    await panel.get_by_role("button", name="Close files").click()
    await expect(panel).to_be_hidden()
    await exit_and_gone(page)
    await context.close()


async def test_upload_errors_are_shown(browser, start_gateway, user):
    gateway = await start_gateway(web={"max_upload_size": "1m"})
    context, page = await open_terminal(browser, gateway, user)
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Upload").click()
    await (await chooser.value).set_files([{"name": "huge.bin", "mimeType": "application/octet-stream", "buffer": b"x" * (2 * 1024 * 1024)}])
    row = await _upload_state(page, "huge.bin")
    await expect(row).to_have_attribute("data-status", "error")
    await expect(row).to_contain_text("too large")
    await expect(row).to_have_attribute("role", "alert")
    # a name the gateway refuses: it explains, the page shows it
    await run_to_end(page, "ln -s /etc ~/etc")
    await page.get_by_role("button", name="Files").click()
    await page.locator("#files").get_by_role("button", name="etc/").click()
    await expect(page.locator("#files-error")).to_contain_text("outside your home directory")
    await exit_and_gone(page)
    await context.close()


async def test_a_script_lost_to_a_network_change_reloads_the_page(browser, gateway, user):
    """Chromium aborts requests in flight when a network interface changes (Wi-Fi roaming, or a
    container's veth on the same host). A module lost that way would leave a dead page: the page
    reloads itself instead, and resumes."""
    context = await browser.new_context()
    page = await context.new_page()
    aborted: list[str] = []

    async def lose_once(route):
        if not aborted:
            aborted.append(route.request.url)
            await route.abort("internetdisconnected")
        else:
            await route.continue_()

    await context.route(re.compile(r"/static/search\.js$"), lose_once)
    await log_in(page, gateway, user)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    assert aborted and aborted[0].endswith("/static/search.js")
    assert await page.evaluate("sessionStorage.getItem('termbridge.load-retries')") is None
    await exit_and_gone(page)
    await context.close()


async def test_status_bar_reconnecting_and_end_session(browser, gateway, user):
    context, page = await open_terminal(browser, gateway, user, viewport={"width": 1000, "height": 600})
    session_id = await page.locator("body").get_attribute("data-session")
    status = page.locator("#status-conn")
    await expect(status).to_have_text("connected")
    await expect(page.locator("#status-user")).to_have_text(user.name)
    await expect(page.locator("#status-session")).to_have_text(session_id[:8])
    await run(page, "echo status-$((6*7))")
    await expect(screen_line(page, "status-42")).to_have_count(1, timeout=15_000)
    await page.screenshot(path=str(ARTIFACTS / "ux-desktop-light.png"))
    assert await page.locator("body").get_attribute("data-theme") == "light"

    # the socket is cut under the page: the status bar says so, then recovers
    await status.evaluate(
        """el => { window.__labels = [];
            new MutationObserver(() => window.__labels.push(el.textContent))
              .observe(el, {childList: true, characterData: true, subtree: true}); }"""
    )
    for ws in list(gateway.app[WEBSOCKETS]):
        ws._writer.transport.abort()
    await wait_for_js(page, "window.__labels.some(l => l.startsWith('reconnecting'))")
    await expect(status).to_have_text("connected", timeout=30_000)
    assert await page.locator("body").get_attribute("data-session") == session_id

    # End session asks first; Cancel keeps it
    await page.get_by_role("button", name="End session").click()
    dialog = page.get_by_role("dialog", name="End this session?")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    await run(page, "echo still-$((6*7))")
    await expect(screen_line(page, "still-42")).to_have_count(1, timeout=15_000)
    # ... and confirming ends it like `exit`: the container goes
    await page.get_by_role("button", name="End session").click()
    await dialog.get_by_role("button", name="End session").click()
    await expect(page.locator("body")).to_have_attribute("data-state", "ended", timeout=15_000)
    await expect(page.locator("body")).to_have_attribute("data-reason", "exit")
    await expect(status).to_have_text("ended")
    await expect(page.locator("#ended-reason")).to_contain_text("You ended the session.")
    await expect(page.get_by_role("button", name="End session")).to_be_disabled()
    await page.screenshot(path=str(ARTIFACTS / "ux-ended.png"))
    await containers_gone(**{"termbridge.session": session_id})
    await context.close()


async def test_idle_countdown_in_status_bar(browser, start_gateway, user):
    gateway = await start_gateway(session={"idle_timeout": "9s"})
    context, page = await open_terminal(browser, gateway, user)
    idle = page.locator("#status-idle")
    await expect(idle).to_be_hidden()
    await expect(idle).to_have_text(re.compile(r"idle: ends in \d s"), timeout=15_000)
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("e")  # any input starts the idle clock over
    await expect(idle).to_be_hidden()
    await expect(page.locator("#banner")).to_be_hidden()
    await expect(idle).to_be_visible(timeout=15_000)
    await expect(page.locator("body")).to_have_attribute("data-reason", "idle", timeout=15_000)
    await expect(idle).to_be_hidden()
    await context.close()


async def test_dark_mode_follows_the_system(browser, gateway, user):
    context, page = await open_terminal(browser, gateway, user, color_scheme="dark", viewport={"width": 1000, "height": 600})
    await expect(page.locator("body")).to_have_attribute("data-theme", "dark")
    await run(page, "ls -la --color=always /etc | head -20")
    await expect(screen_line(page, "total .*")).to_have_count(1, timeout=15_000)
    background = await page.locator(".xterm-scrollable-element").evaluate("e => getComputedStyle(e).backgroundColor")
    assert background == "rgb(30, 30, 30)", background
    bar = await page.locator(".statusbar").evaluate("e => getComputedStyle(e).backgroundColor")
    assert bar == "rgb(51, 51, 51)", bar
    await page.screenshot(path=str(ARTIFACTS / "ux-desktop-dark.png"))
    # and back to light when the system changes its mind
    await page.emulate_media(color_scheme="light")
    await expect(page.locator("body")).to_have_attribute("data-theme", "light")
    await eventually(
        lambda: page.locator(".xterm-scrollable-element").evaluate("e => getComputedStyle(e).backgroundColor"),
        "rgb(251, 251, 250)", "the light background",
    )
    await exit_and_gone(page)
    await context.close()


async def tap(toolbar, *names: str) -> None:
    for name in names:
        await toolbar.get_by_role("button", name=name, exact=True).tap()


async def test_phone_types_with_the_on_screen_keyboard_and_extra_keys(pw, browser, gateway, user):
    context, page = await open_terminal(browser, gateway, user, **pw.devices["Pixel 7"])
    keys = page.get_by_role("toolbar", name="Extra keys")
    await expect(keys).to_be_visible()
    await page.locator("#terminal").tap()
    # an on-screen keyboard delivers text as input events, not key presses
    await page.keyboard.insert_text("ech")
    await tap(keys, "Tab")  # completes to "echo "
    await page.keyboard.insert_text("mobile-$((6*7))")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "mobile-42")).to_have_count(1, timeout=15_000)

    # Ctrl (sticky) + c interrupts; the arrows recall history; Esc . inserts the last argument
    await page.keyboard.insert_text("sleep 300")
    await page.keyboard.press("Enter")
    ctrl = keys.get_by_role("button", name="Ctrl")
    await ctrl.tap()
    await expect(ctrl).to_have_attribute("aria-pressed", "true")
    await page.keyboard.insert_text("c")
    await expect(ctrl).to_have_attribute("aria-pressed", "false")
    await expect(page.locator(".xterm-rows")).to_contain_text("^C", timeout=15_000)
    await page.keyboard.insert_text("clear")
    await page.keyboard.press("Enter")
    await tap(keys, "Up arrow", "Up arrow", "Up arrow")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "mobile-42")).to_have_count(1, timeout=15_000)
    await page.keyboard.insert_text("echo ab")
    await tap(keys, "Left arrow")
    await page.keyboard.insert_text("X")
    await tap(keys, "Right arrow")
    await page.keyboard.insert_text("Y")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "aXbY")).to_have_count(1, timeout=15_000)
    await page.keyboard.insert_text("clear; cat -A")
    await page.keyboard.press("Enter")
    await tap(keys, "Esc", "Tab", "Pipe")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, re.escape("^[^I|$"))).to_have_count(1, timeout=15_000)
    await ctrl.tap()
    await page.keyboard.insert_text("d")
    await expect(page.locator("body")).to_have_attribute("data-state", "running")
    await page.screenshot(path=str(ARTIFACTS / "ux-mobile.png"))
    # the status bar fits the narrow screen
    assert (await page.locator(".statusbar").bounding_box())["width"] <= pw.devices["Pixel 7"]["viewport"]["width"]
    await exit_and_gone(page)
    await context.close()


async def test_screen_reader_mode_and_accessible_login(browser, gateway, user):
    context = await browser.new_context()
    page = await context.new_page()
    await goto(page, gateway.url + "/login")
    # keyboard only: the name field has focus, Tab reaches the password, Enter submits
    await expect(page.get_by_label("Username")).to_be_focused()
    await page.keyboard.type(user.name)
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Password")).to_be_focused()
    await page.keyboard.type("not-the-password")
    await page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Login failed")
    # the error is announced with the field that has focus again, and the fields say they are invalid
    password = page.get_by_label("Password")
    await expect(password).to_be_focused()
    await expect(password).to_have_attribute("aria-invalid", "true")
    await expect(password).to_have_accessible_description(re.compile("Login failed"))
    await expect(page.get_by_label("Username")).to_have_value(user.name)
    await page.keyboard.type(user.password)
    await page.keyboard.press("Enter")
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)

    # screen reader mode: xterm keeps an accessible copy of the screen, and the choice is remembered
    assert await page.locator(".xterm-accessibility-tree").count() == 0
    await page.locator("#settings summary").click()
    await page.get_by_label("Screen reader mode").check()
    await run(page, "echo spoken-$((6*7))")
    await expect(page.locator(".xterm-accessibility-tree")).to_contain_text("spoken-42", timeout=15_000)
    await reload(page)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-accessibility-tree")).to_contain_text("spoken-42", timeout=15_000)
    await exit_and_gone(page)
    await context.close()


async def test_webgl_renderer_with_fallback(pw, gateway, user):
    """Without --disable-webgl, Chromium's software WebGL runs xterm's WebGL renderer; when the
    context is lost for good the page falls back to the DOM renderer by itself."""
    flags = [f for f in CHROMIUM_FLAGS if f != "--disable-webgl"]
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
    try:
        page = await browser.new_page()
        await log_in(page, gateway, user)
        await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
        await expect(page.locator("body")).to_have_attribute("data-renderer", "webgl")
        assert await page.locator(".xterm-screen canvas").count() >= 1
        await page.locator("#settings summary").click()
        await page.get_by_label("Screen reader mode").check()
        await run(page, "echo drawn-$((6*7))")
        await expect(page.locator(".xterm-accessibility-tree")).to_contain_text("drawn-42", timeout=15_000)

        await page.evaluate(
            """() => { for (const c of document.querySelectorAll('.xterm-screen canvas')) {
                 const gl = c.getContext('webgl2'); const ext = gl && gl.getExtension('WEBGL_lose_context');
                 if (ext) ext.loseContext(); } }"""
        )
        await expect(page.locator("body")).to_have_attribute("data-renderer", "dom", timeout=15_000)
        await run(page, "echo after-$((6*7))")
        await expect(screen_line(page, "after-42")).to_have_count(1, timeout=15_000)
        await exit_and_gone(page)
    finally:
        await browser.close()


async def test_static_assets_come_from_npm(gateway):
    """Every addon is served from web/node_modules (npm, same lock file), none from a CDN."""
    import aiohttp

    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        for path in (
            "/static/vendor/addon-search/lib/addon-search.mjs", "/static/vendor/addon-unicode11/lib/addon-unicode11.mjs",
            "/static/vendor/addon-web-links/lib/addon-web-links.mjs", "/static/vendor/addon-webgl/lib/addon-webgl.mjs",
            "/static/terminal.js", "/static/login.js",
        ):
            resp = await http.get(path)
            assert resp.status == 200, path
        page = await (await http.get("/login")).text()
    assert "<script>" not in page and "onclick" not in page and "style=" not in page
    for template in ("terminal.html", "login.html"):
        text = (ARTIFACTS.parent / "web" / "templates" / template).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template  # no inline scripts
        assert not re.search(r"\son[a-z]+=", text), template  # no inline event handlers
        assert "style=" not in text and "http" not in text.replace("http-equiv", ""), template


# What the security work's header is expected to be (xterm.js itself injects <style> elements,
# so styles need 'unsafe-inline'; scripts do not).
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


async def test_page_works_under_a_strict_content_security_policy(pw, gateway, user):
    """No inline script and no inline handler anywhere: with `script-src 'self'` the pages log in,
    type, search, list files and report no violation. (The header is added by intercepting the
    page; Chromium then treats the page as non-local, hence the flag that lets it reach 127.0.0.1.)"""
    flags = [*CHROMIUM_FLAGS, "--disable-features=LocalNetworkAccessChecks"]
    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=flags, headless=True)
    try:
        context = await browser.new_context()

        async def with_csp(route):
            response = await route.fetch(max_redirects=0)
            await route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

        await context.route(re.compile(r"/(login)?$"), with_csp)
        await context.add_init_script(
            "document.addEventListener('securitypolicyviolation', e =>"
            " (window.__violations = window.__violations || []).push(e.violatedDirective + ' ' + e.sourceFile))"
        )
        page = await context.new_page()
        await goto(page, gateway.url + "/login")
        await expect(page.get_by_label("Username")).to_be_focused()  # login.js ran
        await page.get_by_label("Username").fill(user.name)
        await page.get_by_label("Password").fill(user.password)
        await page.get_by_role("button", name="Log in").click()  # the real form, CSRF token and all
        await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
        await run(page, "echo csp-$((6*7))")
        await expect(screen_line(page, "csp-42")).to_have_count(1, timeout=15_000)
        await page.keyboard.press("Control+Shift+F")
        await page.get_by_label("Search text").fill("csp-42")
        await expect(page.locator("#search-count")).to_have_text("1 of 1")
        await page.get_by_label("Search text").press("Escape")
        await page.get_by_role("button", name="Files").click()
        await expect(page.locator("#files-list")).to_contain_text(re.compile(r"\(empty\)|\w"))
        violations = await page.evaluate("window.__violations || []")
        assert not [v for v in violations if not v.startswith("style-src")], violations
        await exit_and_gone(page)
    finally:
        await browser.close()
