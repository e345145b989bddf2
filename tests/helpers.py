"""Test harness: what only the tests need (containers by label, log scanning, metrics, TLS,
gateway processes, browser steps), plus, re-exported, testbed's accounts and gateway client that
the benchmarks share."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import docker
from prometheus_client.parser import text_string_to_metric_families

from testbed.accounts import PASSWORDS, HostUser, create_user, delete_user
from testbed.gateway import (
    CHROMIUM, CHROMIUM_FLAGS, PROMPT, TEST_IMAGE, Gateway, Terminal, csrf_token, free_port, wait_for, wait_for_js,
    write_config,
)

__all__ = [
    "CHROMIUM", "CHROMIUM_FLAGS", "PASSWORDS", "PROMPT", "TEST_IMAGE", "Gateway", "HostUser", "Terminal",
    "create_user", "csrf_token", "delete_user", "free_port", "wait_for", "wait_for_js", "write_config",
]

ROOT = Path(__file__).resolve().parent.parent
SESSION_LABEL = "termbridge.session"
ARTIFACTS = ROOT / "test-artifacts"


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
    """The sum of `name`'s samples that carry `labels` (other labels, e.g. profile, summed over).
    A name with no such sample at all is an error, not 0."""
    wanted = set(labels.items())
    found = [value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= set(sample_labels)]
    if not found:
        raise KeyError((name, tuple(sorted(labels.items()))))
    return sum(found)


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


class GatewayProcess:
    """`termbridge serve` as a real process on a free loopback port, restartable on one config."""

    def __init__(self, config_path, port: int) -> None:
        self.config_path, self.port = config_path, port
        self.gateway = Gateway(f"http://127.0.0.1:{port}", None, None, config_path)  # type: ignore[arg-type]
        self.proc: subprocess.Popen | None = None
        self.prefix: tuple[str, ...] = ()  # a command the gateway runs under (e.g. unshare)

    async def start(self, env: dict[str, str] | None = None) -> None:
        # stderr to a file, never an unread pipe: a full pipe would block the gateway's logging.
        self.log_path = Path(str(self.config_path) + ".log")
        with open(self.log_path, "ab") as log:
            proc = self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
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


async def containers_gone(**labels: str) -> None:
    await wait_for(lambda: not session_containers(**labels), what=f"containers {labels} to be removed")


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
        await goto(page, gateway.url + gateway.base)
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


# -- accessibility (axe-core from web/node_modules, a dev dependency) ----------------------------

AXE = ROOT / "web" / "node_modules" / "axe-core" / "axe.min.js"


def _describe(violation: dict[str, Any]) -> str:
    """One violation as `rule (impact): help`, then each element's selector and axe's summary."""
    lines = [f"{violation['id']} ({violation['impact']}): {violation['help']}"]
    for node in violation["nodes"]:
        lines.append(f"  {' '.join(map(str, node['target']))}: {node['failureSummary'].splitlines()[-1].strip()}")
    return "\n".join(lines)


async def axe_violations(page: Any) -> list[dict[str, Any]]:
    """What axe-core finds on the page as it is now, every rule axe runs by default. Its source goes
    in through page.evaluate (DevTools' Runtime.evaluate), which the page's Content-Security-Policy
    does not govern: a <script> tag (page.add_script_tag) is refused by `script-src 'self'`, and the
    check must run against the production CSP as it is."""
    if not AXE.exists():
        raise RuntimeError(f"{AXE} is missing: run `npm ci` in web/ (or `make assets`)")
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE.read_text())
    return await page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations.map(v => ({
            id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target, failureSummary: n.failureSummary || ""})),
        }))"""
    )


async def axe_check(page: Any, name: str) -> None:
    """Screenshot the page to test-artifacts/a11y-<name>.png, then fail on any axe violation."""
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"a11y-{name}.png"))
    violations = await axe_violations(page)
    assert not violations, f"axe on {name}:\n" + "\n".join(map(_describe, violations))
