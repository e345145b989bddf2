"""A real gateway's config and its clients: the login form, the WebSocket terminal, waits."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge.config import Config
from testbed.accounts import HostUser

# The session image under test; a developer changing session-image/ can test a private tag.
TEST_IMAGE = os.environ.get("TB_TEST_IMAGE", "termbridge/session:latest")
PROMPT = re.compile(rb"[$#] (?:\x1b\[K)?$")
# Browser tests drive Debian's Chromium through playwright (nothing downloads a browser).
CHROMIUM = "/usr/bin/chromium"
# --disable-webgl: xterm then renders with DOM rows the tests can read (the page falls back to
# that renderer by itself); test_browser_ux checks the WebGL renderer in a browser without it.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-webgl",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, state_dir: Path, pam_service: str, **sections: dict[str, Any]) -> Path:
    """A TOML config for a test gateway: loopback, port 0, its own state dir and instance."""
    data: dict[str, dict[str, Any]] = {
        "web": {"listen": "127.0.0.1:0"},
        "ssh": {"listen": ""},
        "auth": {"pam_service": pam_service},
        # A test gateway that stops ends its sessions (nothing comes back for them); the restart
        # tests ask for "keep".
        "session": {"image": TEST_IMAGE, "on_shutdown": "end"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    lines = [f'state_dir = "{state_dir}"']
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


async def csrf_token(http: aiohttp.ClientSession, path: str = "/login") -> str:
    """The login form's CSRF token; the CSRF cookie lands in `http`'s cookie jar."""
    async with http.get(path) as resp:
        match = CSRF_FIELD.search(await resp.text())
    assert match, f"no CSRF token in {path}"
    return match.group(1)


async def wait_for_js(page, expression: str, timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll a JavaScript expression from here. (Playwright's wait_for_function compiles its
    predicate with eval inside the page, which the terminal page's strict CSP forbids.)"""
    await wait_for(lambda: page.evaluate(expression), timeout=timeout, interval=interval, what=expression)


async def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Terminal:
    """A WebSocket terminal client speaking the gateway's /ws protocol."""

    ws: aiohttp.ClientWebSocketResponse
    output: bytearray = field(default_factory=bytearray)  # not yet consumed by expect()
    transcript: bytearray = field(default_factory=bytearray)  # every byte received
    controls: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None  # from the server's close frame, as a browser reports it

    @property
    def received(self) -> int:
        return len(self.transcript)

    async def _receive(self, timeout: float) -> None:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            self.output.extend(msg.data)
            self.transcript.extend(msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            self.controls.append(json.loads(msg.data))
        else:
            if msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_code = msg.data
            self.closed = True

    async def control(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first control message of `kind` (already received or next)."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.controls:
                if msg.get("type") == kind:
                    return msg
            if self.closed:
                raise AssertionError(f"socket closed before a {kind!r} message; got {self.controls}")
            await self._receive(max(0.01, deadline - time.monotonic()))

    async def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> re.Match[bytes]:
        """Wait until the output (since the last expect) matches; consume through the match."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(bytes(self.output))
            if match:
                del self.output[: match.end()]
                return match
            if self.closed:
                raise AssertionError(f"socket closed waiting for {regex.pattern!r}; output {bytes(self.output)[-500:]!r}")
            try:
                await self._receive(max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"timed out waiting for {regex.pattern!r}; output {bytes(self.output)[-500:]!r}"
                ) from None

    async def send(self, text: str) -> None:
        await self.ws.send_bytes(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def run(self, command: str, timeout: float = 30.0) -> str:
        """Run a command and return what it printed between two markers."""
        marker = secrets.token_hex(4)
        await self.send(f"echo B{marker}; {command}; echo E{marker}\r")
        match = await self.expect(re.compile(rb"[\r\n]B" + marker.encode() + rb"\r\n(.*?)E" + marker.encode() + rb"\r\n", re.S), timeout)
        return match.group(1).decode(errors="replace").replace("\r\n", "\n")

    def cut(self) -> None:
        """Drop the connection the hard way (no close handshake), like a network blip."""
        transport = self.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()
        self.closed = True

    async def drain_until_closed(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            await self._receive(max(0.01, deadline - time.monotonic()))


@dataclass
class Gateway:
    """A gateway under test (in this process or a child: then `config` and `app` are None) and
    the client calls that reach it."""

    url: str
    config: Config
    app: web.Application
    config_path: Path | None = None

    @property
    def origin(self) -> str:
        return self.url

    @property
    def base(self) -> str:
        """`web.base_path` ("/" for a gateway in a child process): every path starts with it."""
        return self.config.web.base_path if self.config is not None else "/"

    def path(self, path: str) -> str:
        """`path` ("/login", "/ws") under the gateway's base path."""
        return self.base + path.lstrip("/")

    async def login(self, user: HostUser, password: str | None = None, **client: Any) -> aiohttp.ClientSession:
        """A client session holding the login cookie (raises if the login fails); `client` goes to
        aiohttp.ClientSession (e.g. a connector for TLS)."""
        http = aiohttp.ClientSession(base_url=self.url, cookie_jar=aiohttp.CookieJar(unsafe=True), **client)
        resp = await http.post(
            self.path("/login"),
            data={"username": user.name, "password": password or user.password,
                  "csrf": await csrf_token(http, self.path("/login"))},
            headers={"Origin": self.origin},
            allow_redirects=False,
        )
        if resp.status != 303:
            await http.close()
            raise AssertionError(f"login of {user.name} failed: {resp.status}")
        return http

    async def attempt_login(self, username: str, password: str) -> int:
        """One login attempt through the form (CSRF token included); the HTTP status."""
        async with aiohttp.ClientSession(base_url=self.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            resp = await http.post(
                self.path("/login"),
                data={"username": username, "password": password, "csrf": await csrf_token(http, self.path("/login"))},
                headers={"Origin": self.origin},
                allow_redirects=False,
            )
            return resp.status

    async def terminal(self, http: aiohttp.ClientSession, path: str = "/ws", cols: int = 80, rows: int = 24) -> Terminal:
        ws = await http.ws_connect(self.path(path), headers={"Origin": self.origin}, max_msg_size=0)
        term = Terminal(ws)
        await term.resize(cols, rows)
        return term
