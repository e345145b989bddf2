"""Test harness: real PAM accounts, real gateways on port 0, a WebSocket terminal client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
# The session image under test; a developer changing session-image/ can test a private tag.
TEST_IMAGE = os.environ.get("TB_TEST_IMAGE", "termbridge/session:latest")
SESSION_LABEL = "termbridge.session"
PROMPT = re.compile(rb"[$#] (?:\x1b\[K)?$")
# Browser tests drive Debian's Chromium through playwright (nothing downloads a browser).
CHROMIUM = "/usr/bin/chromium"
# --disable-webgl: xterm then renders with DOM rows the tests can read (the page falls back to
# that renderer by itself); test_browser_ux checks the WebGL renderer in a browser without it.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-webgl",
]
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class HostUser:
    name: str
    password: str


# Every password the suite gave a test account: none may ever show up in a log line.
PASSWORDS: list[str] = []


def run(*cmd: str, input: str | None = None) -> None:
    subprocess.run(cmd, check=True, input=input, text=True, capture_output=True)


def create_user(
    *, shell: str = "/bin/bash", locked: bool = False, expired: bool = False, groups: tuple[str, ...] = ()
) -> HostUser:
    name = "tb" + secrets.token_hex(4)
    password = "pw-" + secrets.token_urlsafe(12)
    PASSWORDS.append(password)
    run("useradd", "--create-home", "--shell", shell, name)
    run("chpasswd", input=f"{name}:{password}\n")
    if groups:
        run("usermod", "-a", "-G", ",".join(groups), name)
    if locked:
        run("usermod", "-L", name)
    if expired:
        run("chage", "-E", "2000-01-01", name)
    return HostUser(name, password)


def delete_user(user: HostUser) -> None:
    subprocess.run(["userdel", "-r", "-f", user.name], capture_output=True)


def write_config(path: Path, state_dir: Path, pam_service: str, **sections: dict[str, Any]) -> Path:
    """A TOML config for a test gateway: loopback, port 0, its own state dir and instance."""
    data: dict[str, dict[str, Any]] = {
        "web": {"listen": "127.0.0.1:0"},
        "ssh": {"listen": ""},
        "auth": {"pam_service": pam_service},
        "session": {"image": TEST_IMAGE},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    lines = [f'state_dir = "{state_dir}"']
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def session_containers(**labels: str) -> list[Any]:
    client = docker.from_env()
    try:
        filters = [SESSION_LABEL] + [f"{k}={v}" for k, v in labels.items()]
        return client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)
    finally:
        client.close()


def secret_forms(secret: str | bytes) -> list[str]:
    """The ways a secret could be spelled in a log line: as is, hex, base64 (either alphabet)."""
    if isinstance(secret, str):
        return [secret]
    forms = [secret.hex(), base64.b64encode(secret).decode().rstrip("="), base64.urlsafe_b64encode(secret).decode().rstrip("=")]
    try:
        forms.append(secret.decode())
    except UnicodeDecodeError:
        pass
    return [f for f in forms if len(f) >= 8]


def private_key_fragments(exported: bytes) -> list[str]:
    """The body lines of an exported private key: any one of them in a log is a leak."""
    return [line for line in exported.decode().splitlines() if line and not line.startswith("-----") and len(line) >= 20]


def find_secrets(lines: list[str], secrets_: list[str | bytes]) -> list[str]:
    """Log lines that contain a secret (or any private key block at all), secret redacted."""
    needles = {form for secret in secrets_ for form in secret_forms(secret)}
    found = []
    for line in lines:
        hits = [n for n in needles if n in line]
        if hits or "PRIVATE KEY-----" in line:
            for needle in hits:
                line = line.replace(needle, "<SECRET>")
            found.append(line[:300])
    return found


CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


async def csrf_token(http: aiohttp.ClientSession, path: str = "/login") -> str:
    """The login form's CSRF token; the CSRF cookie lands in `http`'s cookie jar."""
    async with http.get(path) as resp:
        match = CSRF_FIELD.search(await resp.text())
    assert match, f"no CSRF token in {path}"
    return match.group(1)


async def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed with prometheus-client's own parser: every sample, keyed by
    (name, sorted labels)."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics", headers=headers or {}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway certificate for `host` (an IP address), valid for a day: (cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a child this test started: `sig` first, SIGKILL if it does not go in time."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """`termbridge serve` as a real process on a free loopback port, restartable on one config."""

    def __init__(self, config_path, port: int) -> None:
        from conftest import Gateway

        self.config_path, self.port = config_path, port
        self.gateway = Gateway(f"http://127.0.0.1:{port}", None, None, config_path)  # type: ignore[arg-type]
        self.proc: subprocess.Popen | None = None

    async def start(self, env: dict[str, str] | None = None) -> None:
        # stderr to a file, never an unread pipe: a full pipe would block the gateway's logging.
        self.log_path = Path(str(self.config_path) + ".log")
        with open(self.log_path, "ab") as log:
            proc = self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=env,
            )

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{self.gateway.url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                assert proc.poll() is None, self.log()[-3000:]
                return False

        await wait_for(healthy, timeout=30, what="gateway to answer /healthz")

    def log(self) -> str:
        """What the gateway wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=15)


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


async def containers_gone(**labels: str) -> None:
    await wait_for(lambda: not session_containers(**labels), what=f"containers {labels} to be removed")


@dataclass
class Terminal:
    """A WebSocket terminal client speaking the SPEC protocol."""

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


# -- browser helpers (playwright) ---------------------------------------------------------------


def screen_line(page: Any, pattern: str) -> Any:
    """A row of the terminal whose whole text matches `pattern`."""
    return page.locator(".xterm-rows > div", has_text=re.compile(rf"^\s*{pattern}\s*$"))


async def _navigate(navigation: Any) -> None:
    """Run a navigation, again when Chromium aborted it with ERR_NETWORK_CHANGED: it does that to
    requests in flight whenever a network interface comes or goes, and every container start or
    removal on this machine (ours, or a parallel run's) adds or removes a veth interface. (The
    terminal page reloads itself when its scripts fail that way: web/static/boot.js.)"""
    from playwright.async_api import Error as PlaywrightError

    for attempt in range(3):
        try:
            await navigation()
            return
        except PlaywrightError as exc:
            if "ERR_NETWORK_CHANGED" not in str(exc) or attempt == 2:
                raise


async def goto(page: Any, url: str) -> None:
    await _navigate(lambda: page.goto(url))


async def reload(page: Any) -> None:
    await _navigate(page.reload)


async def log_in(page: Any, gateway: Any, user: HostUser, password: str | None = None) -> None:
    from playwright.async_api import expect

    for attempt in range(3):
        await goto(page, gateway.url + "/")
        await expect(page).to_have_url(re.compile(r"/login$"))
        await page.get_by_label("Username").fill(user.name)
        await page.get_by_label("Password").fill(password or user.password)
        await page.get_by_role("button", name="Log in").click()
        await page.wait_for_load_state()
        if not page.url.startswith("chrome-error:") or attempt == 2:  # see goto()
            return


async def refusal_times(
    attempt: Any, known: list[HostUser], refused_names: list[str], rounds: int = 4
) -> tuple[list[float], list[float]]:
    """How long a door takes to refuse (a) a wrong password of a real account and (b) a name that
    is refused before its password is checked (unknown, nologin shell, ...): `rounds` rounds of
    pairs in parallel, each from its own client address. `attempt(name, password, address)` does one."""

    async def timed(name: str, password: str, address: str) -> float:
        started = time.monotonic()
        await attempt(name, password, address)
        return time.monotonic() - started

    wrong: list[float] = []
    refused: list[float] = []
    for r in range(rounds):
        # libpam's random failure delay is a function of the second PAM starts in: each round
        # starts just after a second begins, so that its attempts mostly share one delay, and
        # interleaves the two kinds, so that a second boundary splits both alike.
        await asyncio.sleep(1.02 - time.time() % 1)
        times = await asyncio.gather(*(
            coro
            for i, (u, name) in enumerate(zip(known, refused_names))
            for coro in (
                timed(u.name, "not-" + u.password, f"127.0.{10 + r}.{i + 1}"),
                timed(name, "whatever-1", f"127.0.{20 + r}.{i + 1}"),
            )
        ))
        wrong += times[0::2]
        refused += times[1::2]
    return wrong, refused


def assert_same_timing(wrong: list[float], refused: list[float], tolerance: float = 0.2) -> None:
    """The medians of the two differ by less than `tolerance` of the wrong-password one."""
    import statistics

    a, b = statistics.median(wrong), statistics.median(refused)
    assert abs(a - b) < tolerance * a, f"median refusal {b:.2f} s vs wrong password {a:.2f} s"
