"""The web door's defences: CSRF tokens, Origin checks, fresh cookies, security headers; the
headers and the framing ban also in a real Chromium."""

from __future__ import annotations

import re

import aiohttp
import pytest
from playwright.async_api import expect
from yarl import URL

from bridge.web.login import COOKIE_NAME, CSRF_COOKIE
from helpers import csrf_token
from test_browser import open_terminal_page

FOREIGN = "http://evil.example"


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)


def login_cookie(http: aiohttp.ClientSession, gateway) -> str | None:
    morsel = http.cookie_jar.filter_cookies(URL(gateway.url)).get(COOKIE_NAME)
    return morsel.value if morsel else None


async def test_login_needs_the_forms_csrf_token(gateway, user):
    form = {"username": user.name, "password": user.password}
    headers = {"Origin": gateway.origin}
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=jar()) as http:
        resp = await http.post("/login", data=form, headers=headers, allow_redirects=False)
        assert resp.status == 403 and "expired" in await resp.text()
        assert login_cookie(http, gateway) is None
        # a token made for another browser does not fit this browser's CSRF cookie
        async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=jar()) as other:
            foreign_token = await csrf_token(other)
        await csrf_token(http)
        resp = await http.post("/login", data={**form, "csrf": foreign_token}, headers=headers, allow_redirects=False)
        assert resp.status == 403 and login_cookie(http, gateway) is None
        resp = await http.post("/login", data={**form, "csrf": await csrf_token(http)}, headers=headers,
                               allow_redirects=False)
        assert resp.status == 303 and login_cookie(http, gateway)
    csrf = [c for c in resp.headers.getall("Set-Cookie", []) if c.startswith(CSRF_COOKIE)]
    assert not csrf or "samesite=strict" in csrf[0].lower()


async def test_foreign_origins_are_refused_everywhere(gateway, user):
    async with await gateway.login(user) as http:
        token = await csrf_token(http, "/")
        resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": FOREIGN}, allow_redirects=False)
        assert resp.status == 403
        assert (await http.get("/", allow_redirects=False)).status == 200  # still logged in
        login_token = await csrf_token(http)
        resp = await http.post("/login", data={"username": user.name, "password": user.password, "csrf": login_token},
                               headers={"Origin": FOREIGN}, allow_redirects=False)
        assert resp.status == 403
        resp = await http.get("/ws", headers={"Origin": FOREIGN, "Connection": "Upgrade", "Upgrade": "websocket",
                                              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert resp.status == 403
        # the WebSocket has no CSRF token: there the Origin is mandatory
        resp = await http.get("/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert resp.status == 403


async def test_logout_needs_its_token(gateway, user):
    async with await gateway.login(user) as http:
        resp = await http.post("/logout", data={"csrf": "forged"}, headers={"Origin": gateway.origin},
                               allow_redirects=False)
        assert resp.status == 403
        assert (await http.get("/", allow_redirects=False)).status == 200
        token = await csrf_token(http, "/")
        # Chromium sends Origin "null" from our no-referrer pages; the token carries the check
        resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": "null"}, allow_redirects=False)
        assert resp.status == 303
        assert (await http.get("/", allow_redirects=False)).status == 303


async def test_a_cookie_planted_before_login_is_replaced_and_old_logins_die(gateway, user):
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=jar()) as http:
        http.cookie_jar.update_cookies({COOKIE_NAME: "planted-by-attacker"}, URL(gateway.url))
        form = {"username": user.name, "password": user.password}
        resp = await http.post("/login", data={**form, "csrf": await csrf_token(http)},
                               headers={"Origin": gateway.origin}, allow_redirects=False)
        assert resp.status == 303
        first = login_cookie(http, gateway)
        assert first and first != "planted-by-attacker"
        resp = await http.post("/login", data={**form, "csrf": await csrf_token(http)},
                               headers={"Origin": gateway.origin}, allow_redirects=False)
        second = login_cookie(http, gateway)
        assert second and second != first
    async with aiohttp.ClientSession(base_url=gateway.url, cookies={COOKIE_NAME: first}) as replay:
        assert (await replay.get("/", allow_redirects=False)).status == 303  # the old login is gone
    async with aiohttp.ClientSession(base_url=gateway.url, cookies={COOKIE_NAME: second}) as current:
        assert (await current.get("/", allow_redirects=False)).status == 200


async def test_security_headers_on_every_response(gateway, user):
    async with await gateway.login(user) as http:
        responses = [
            await http.get("/"),
            await http.get("/login"),
            await http.get("/static/terminal.js"),
            await http.get("/static/vendor/xterm/lib/xterm.mjs"),
            await http.get("/healthz"),
            await http.get("/no-such-page"),
            await http.get("/ws"),  # not an upgrade: an error response, with the headers too
        ]
        for resp in responses:
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "script-src 'self';" in csp, resp.url
            assert "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["X-Frame-Options"] == "DENY"
        page = responses[0]
        assert re.search(r"style-src 'self' 'nonce-[\w-]+'", page.headers["Content-Security-Policy"])
        assert page.headers["Cache-Control"] == "no-store"


@pytest.mark.browser
async def test_terminal_runs_under_the_policy_and_cannot_be_framed(browser, gateway, user):  # noqa: F811
    page = await browser.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    await open_terminal_page(page, gateway, user)
    # palette colours come from xterm's <style> elements, true colours from style attributes
    await page.keyboard.type("clear; printf '\\e[31mPALETTE\\e[0m \\e[38;2;1;2;3mTRUECOLOR\\e[0m\\n'")
    await page.keyboard.press("Enter")
    truecolor = page.locator(".xterm-rows span", has_text=re.compile("^TRUECOLOR$"))
    await expect(truecolor).to_have_css("color", "rgb(1, 2, 3)", timeout=15_000)
    palette = page.locator(".xterm-rows span", has_text=re.compile("^PALETTE$"))
    default = await page.locator(".xterm-rows").evaluate("e => getComputedStyle(e).color")
    await expect(palette).to_have_count(1)
    assert await palette.evaluate("e => getComputedStyle(e).color") != default
    assert not [m for m in console if "Content Security Policy" in m], console

    # a page of another origin that frames the gateway gets nothing
    framer = await browser.new_page()
    framer_console: list[str] = []
    framer.on("console", lambda msg: framer_console.append(msg.text))
    await framer.set_content(f'<iframe id="f" src="{gateway.url}/login"></iframe>')
    await framer.wait_for_timeout(1500)
    frame = framer.frame(url=re.compile(r"/login$"))
    has_form = frame is not None and await frame.locator("input[name=password]").count() > 0
    assert not has_form
    assert [m for m in framer_console if "frame-ancestors" in m], framer_console
    await page.close()
    await framer.close()
