"""`web.base_path`: the key's validation, and a real gateway under "/terminal/" that serves every
page, asset, socket and endpoint there and answers nothing outside it. The same through nginx,
in Chromium, is in test_deploy.py."""

from __future__ import annotations

import re

import aiohttp
import pytest

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.web.login import COOKIE_NAME, CSRF_COOKIE
from helpers import PROMPT, Terminal, containers_gone
from testbed.gateway import CSRF_FIELD

BASE = "/terminal/"


@pytest.mark.parametrize("value", ["/", "/terminal/", "/a/b-c_d.e~f/"])
def test_base_path_accepts_plain_directory_paths(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(f'[web]\nbase_path = "{value}"\n')
    assert load_config(path, env={}).web.base_path == value


@pytest.mark.parametrize(
    "value, says",
    [
        ("terminal/", "start and end with '/'"),
        ("/terminal", "start and end with '/'"),
        ("", "start and end with '/'"),
        ("/a/../b/", "'..'"),
        ("/./", "'..'"),
        ("/a?x=1/", "plain path"),
        ("/a#b/", "plain path"),
        ("//evil.example/", "plain path"),
        ("/a%2e%2e/", "plain path"),
        ("/a b/", "plain path"),
        ("/a\\\\b/", "plain path"),
    ],
)
def test_base_path_refuses_what_a_proxy_or_browser_could_read_differently(tmp_path, value, says):
    path = tmp_path / "c.toml"
    path.write_text(f'[web]\nbase_path = "{value}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "web.base_path" in str(info.value) and says in str(info.value)
    with pytest.raises(ConfigError, match="web.base_path"):
        load_config(tmp_path / "c.toml", env={"TERMBRIDGE_WEB_BASE_PATH": value})


OUTSIDE = [
    ("GET", "/"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"), ("GET", "/ws"),
    ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/static/termbridge.css"),
    ("GET", "/static/vendor/xterm/lib/xterm.mjs"), ("GET", "/files"), ("GET", "/files/download"),
    ("PUT", "/files/upload"), ("GET", "/terminalx/"), ("GET", "/terminal/../login"), ("GET", "/Terminal/login"),
]


async def test_everything_is_served_under_the_base_path_and_nothing_outside(start_gateway, user):
    gateway = await start_gateway(web={"base_path": BASE})
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=jar) as http:
        for method, path in OUTSIDE:
            async with http.request(method, path, allow_redirects=False, headers={"Origin": gateway.url}) as resp:
                assert resp.status == 404, (method, path, resp.status)
        async with http.get("/terminal", allow_redirects=False) as resp:  # into the base, as nginx does
            assert resp.status == 301 and resp.headers["Location"] == BASE

        async with http.get(BASE, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == BASE + "login"
        async with http.get(BASE + "login") as resp:
            form = await resp.text()
            assert resp.status == 200
            assert resp.cookies[CSRF_COOKIE]["path"] == BASE + "login"
        # every link of the page is under the base, and each one answers
        links = re.findall(r'(?:href|src|action)="([^"]+)"', form)
        assert links and all(link.startswith(BASE) for link in links), links
        for link in links:
            if "static/" in link:
                assert (await http.get(link)).status == 200, link
        for path in ("healthz", "static/base.js", "static/vendor/xterm/lib/xterm.mjs"):
            assert (await http.get(BASE + path)).status == 200, path
        assert (await http.get(BASE + "metrics")).status == 200  # loopback is in web.metrics_allow

        csrf = CSRF_FIELD.search(form).group(1)
        async with http.post(BASE + "login", data={"username": user.name, "password": user.password, "csrf": csrf},
                             headers={"Origin": gateway.url}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == BASE
            assert resp.cookies[COOKIE_NAME]["path"] == BASE
        async with http.get(BASE) as resp:
            page = await resp.text()
            assert resp.status == 200 and f'action="{BASE}logout"' in page
        assert all(link.startswith(BASE) for link in re.findall(r'(?:href|src|action)="([^"]+)"', page))
        logout_csrf = CSRF_FIELD.search(page).group(1)

        term = Terminal(await http.ws_connect(BASE + "ws", headers={"Origin": gateway.url}))
        await term.resize(80, 24)
        session_id = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        assert (await term.run("echo under-$((6*7)) | tee f.txt")).strip() == "under-42"

        params = {"session": session_id, "path": "up.txt"}
        async with http.put(BASE + "files/upload", params=params, data=b"uploaded\n",
                            headers={"Origin": gateway.url}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(BASE + "files", params={"session": session_id}) as resp:
            names = {entry["name"] for entry in (await resp.json())["entries"]}
            assert {"f.txt", "up.txt"} <= names
        async with http.get(BASE + "files/download", params={"session": session_id, "path": "f.txt"}) as resp:
            assert await resp.read() == b"under-42\n"

        async with http.post(BASE + "logout", data={"csrf": logout_csrf}, headers={"Origin": gateway.url},
                             allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == BASE + "login"
            assert resp.cookies[COOKIE_NAME]["path"] == BASE and not resp.cookies[COOKIE_NAME].value
        await term.drain_until_closed()  # logout ended the terminal
    await containers_gone(**{"termbridge.session": session_id})
