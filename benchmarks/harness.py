"""What every benchmark here needs: statistics, a throwaway PAM account, a real gateway in its own
process, and Docker look-ups by label and by event.

The gateway runs as `python -m bridge serve` in a child process, so that its CPU and memory are
its own and the clients measuring it do not share its event loop. Everything talks only to
loopback and to containers this run started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker

from testbed.accounts import HostUser, create_user, delete_user
from testbed.gateway import PROMPT, TEST_IMAGE, free_port, write_config

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["PROMPT", "TEST_IMAGE", "HostUser"]

BENCH_LABEL = "termbridge.bench"  # on containers the benchmark starts itself (floor, ttyd)


# -- statistics -----------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples."""
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary(samples: list[float]) -> dict[str, float]:
    """Seconds in, milliseconds out: n, median, p90, p95, p99, min, max."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {
        "n": len(ordered),
        "median_ms": ms(statistics.median(ordered)),
        "p90_ms": ms(percentile(ordered, 90)),
        "p95_ms": ms(percentile(ordered, 95)),
        "p99_ms": ms(percentile(ordered, 99)),
        "min_ms": ms(ordered[0]),
        "max_ms": ms(ordered[-1]),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["mem_total_mb"] = meminfo("MemTotal") // 1024
    with contextlib.suppress(OSError):
        info["kernel"] = Path("/proc/sys/kernel/osrelease").read_text().strip()
    with contextlib.suppress(docker.errors.DockerException):
        client = docker.from_env()
        version = client.version()
        info["docker"] = version.get("Version")
        info["other_containers_running"] = len(client.api.containers(filters={"status": "running"}))
        client.close()
    return info


def meminfo(key: str) -> int:
    """A /proc/meminfo value in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# -- a PAM account and service for the run --------------------------------------------------------


@contextlib.contextmanager
def bench_account() -> Iterator[tuple[str, HostUser]]:
    """A PAM service (the shipped etc/pam.d/termbridge under a name of its own) and a throwaway
    account, both removed afterwards."""
    service = f"termbridge-bench-{os.getpid()}"
    pam_file = Path("/etc/pam.d") / service
    shutil.copyfile(ROOT / "etc" / "pam.d" / "termbridge", pam_file)
    user = create_user()
    try:
        yield service, user
    finally:
        delete_user(user)
        pam_file.unlink(missing_ok=True)


async def login(url: str, user: HostUser) -> aiohttp.ClientSession:
    """An HTTP client holding the login cookie; no limit on connections (the scale run holds
    hundreds of WebSockets on one login)."""
    http = aiohttp.ClientSession(
        base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(limit=0)
    )
    async with http.get("/login") as form:
        token = re.search(r'name="csrf" value="([^"]+)"', await form.text())
    resp = await http.post(
        "/login",
        data={"username": user.name, "password": user.password, "csrf": token.group(1) if token else ""},
        headers={"Origin": url},
        allow_redirects=False,
    )
    if resp.status != 303:
        await http.close()
        raise RuntimeError(f"login of {user.name} failed: HTTP {resp.status}")
    return http


# -- the gateway, in its own process ---------------------------------------------------------------


@dataclass
class GatewayProcess:
    """`termbridge serve` on loopback ports of its own, with a state dir of its own."""

    workdir: Path
    pam_service: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    with_ssh: bool = False
    proc: subprocess.Popen | None = None
    url: str = ""
    ssh_port: int | None = None
    instance_id: str = ""
    log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        web_port = free_port()
        self.ssh_port = free_port() if self.with_ssh else None
        sections = {k: dict(v) for k, v in self.sections.items()}
        sections.setdefault("web", {})["listen"] = f"127.0.0.1:{web_port}"
        sections.setdefault("ssh", {})["listen"] = f"127.0.0.1:{self.ssh_port}" if self.ssh_port else ""
        state = self.workdir / "state"
        config = write_config(self.workdir / "termbridge.toml", state, self.pam_service, **sections)
        self.log_path = self.workdir / "gateway.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.url = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if self._healthy():
                self.instance_id = (state / "instance-id").read_text().strip()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not healthy within {timeout} s; log:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                ok = resp.status == 200
        except OSError:
            return False
        if ok and self.ssh_port:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.ssh_port), timeout=1):
                return True
            return False
        return ok

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def container_of(self, *, session_id: str | None = None, door: str | None = None,
                           exclude: frozenset[str] = frozenset(), timeout: float = 10.0) -> str:
        """The container id of one live session, asked of the gateway itself over its admin
        socket (as `termbridge sessions list` does): labels cannot say it, since a pooled
        container is labelled before its session exists. `exclude`: session ids not meant
        (those `session_ids` listed before this one opened)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self._list()
            found = [s["container"] for s in answer.get("sessions", [])
                     if s.get("container") and (session_id is None or s["id"] == session_id)
                     and (door is None or s["door"] == door) and s["id"] not in exclude]
            if len(found) == 1:
                return await asyncio.to_thread(_container_id, found[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway lists {len(found)} sessions for {session_id or door}: {answer}")
            await asyncio.sleep(0.05)

    async def session_ids(self) -> frozenset[str]:
        return frozenset(s["id"] for s in (await self._list()).get("sessions", []))

    async def _list(self) -> dict[str, Any]:
        from bridge.admin import request, socket_path

        return await asyncio.to_thread(request, socket_path(self.workdir / "state"), {"command": "list"})

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the gateway ends every session and removes every container, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tb-bench-"))


# -- Docker ----------------------------------------------------------------------------------------


def containers(**labels: str) -> list[dict[str, Any]]:
    client = docker.APIClient(version="auto")
    try:
        return client.containers(all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
    finally:
        client.close()


def _container_id(name: str) -> str:
    client = docker.APIClient(version="auto")
    try:
        return client.inspect_container(name)["Id"]
    finally:
        client.close()


def remove_labelled(**labels: str) -> int:
    """Force-remove this run's leftovers (only containers carrying this run's own labels)."""
    client = docker.APIClient(version="auto")
    removed = 0
    try:
        for c in client.containers(all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]}):
            try:
                client.remove_container(c["Id"], force=True, v=True)
                removed += 1
            except docker.errors.APIError as exc:  # gone, or its --rm removal is already under way
                if exc.status_code not in (404, 409):
                    raise
    finally:
        client.close()
    return removed


async def find_container(timeout: float = 10.0, **labels: str) -> str:
    """The id of the one container carrying `labels` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(containers, **labels)
        if len(found) == 1:
            return found[0]["Id"]
        if len(found) > 1:
            raise RuntimeError(f"{len(found)} containers carry {labels}; expected one")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no container carries {labels}")


class DestroyWatch:
    """When Docker destroyed a container, by the daemon's own event clock: no polling delay in
    the measurement. Start it before the action; `since` makes it race-free."""

    def __init__(self, container_id: str, timeout: float = 60.0) -> None:
        self.container_id = container_id
        since = int(time.time()) - 1
        self._task = asyncio.ensure_future(asyncio.to_thread(self._wait, since, since + int(timeout) + 2))

    def _wait(self, since: int, until: int) -> float | None:
        client = docker.APIClient(version="auto")
        try:
            for event in client.events(
                since=since, until=until, decode=True,
                filters={"container": self.container_id, "event": "destroy"},
            ):
                return event["timeNano"] / 1e9
            return None
        finally:
            client.close()

    async def at(self) -> float:
        """Wall-clock time (time.time()) of the destroy event."""
        when = await self._task
        if when is None:
            raise RuntimeError(f"container {self.container_id[:12]} was not destroyed in time")
        return when


async def pool_filled(instance_id: str, size: int, timeout: float, settle: float = 1.0) -> bool:
    """A pooled gateway keeps `size` running containers while no session is live; `settle`
    after that, its newest container's sshd is surely up."""
    from bridge.backends.base import LABEL_GATEWAY

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(containers, **{LABEL_GATEWAY: instance_id})
        if len(found) >= size and all(c["State"] == "running" for c in found):
            await asyncio.sleep(settle)
            return True
        await asyncio.sleep(0.2)
    return False


def run_label() -> str:
    return secrets.token_hex(4)
