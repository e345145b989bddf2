"""Fixtures shared by the suite. Everything here is real: Docker, PAM accounts, the gateway."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from aiohttp import web

from bridge.app import build_app
from bridge.config import load_config
from bridge.upstream import SessionKeys
from bridge.web.login import LoginRegistry
from helpers import (
    CHROMIUM, CHROMIUM_FLAGS, PASSWORDS, ROOT, TEST_IMAGE, Gateway, GatewayProcess, HostUser, create_user,
    delete_user, find_secrets, free_port, private_key_fragments, session_containers, write_config,
)
from testbed.accounts import create_group, delete_group
from testbed.redis_server import RedisServer
from testbed.swarm import SwarmCluster

PAM_SERVICE = f"termbridge-test-{os.getpid()}"
# State dirs of every gateway this run started: their instance ids scope the leak check, so that
# two runs on one machine do not see each other's containers. Under CI every container counts.
STATE_DIRS: list[Path] = []


def _instance_ids() -> set[str]:
    return {(d / "instance-id").read_text().strip() for d in STATE_DIRS if (d / "instance-id").exists()}


@pytest.fixture(scope="session", autouse=True)
def no_leaked_containers() -> Iterator[None]:
    """Fails the run if any session container outlives the suite (and cleans it up)."""
    yield
    ours = _instance_ids()
    leftovers = [
        c for c in session_containers()
        if os.environ.get("CI") == "true" or c.labels.get("termbridge.gateway") in ours
    ]
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, "leaked session containers: " + ", ".join(
        f"{c.name} ({c.status}, started {c.labels.get('termbridge.started')})" for c in leftovers
    )


class LogRecorder(logging.Handler):
    """Every log line of the suite, formatted as an admin would read it (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that does not format is still text to scan
            self.lines.append(f"{record.msg!r} {record.args!r}")


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """Fails the run if a password, a cookie secret, a login cookie or a private key (the
    per-session keys, the gateway's host key) appears in any log line of the suite. The key and
    cookie makers are observed, not replaced: they run as always and hand over what they made."""
    recorder = LogRecorder()
    logging.getLogger().addHandler(recorder)
    made: list[str | bytes] = []
    patch = pytest.MonkeyPatch()
    generate, issue = SessionKeys.generate, LoginRegistry.issue

    def observed_generate(cls: type) -> SessionKeys:
        keys = generate()
        for key in (keys.client_key, keys.host_key):
            made.extend(private_key_fragments(key.export_private_key("openssh")))
        return keys

    async def observed_issue(self: LoginRegistry, user: Any) -> Any:
        login, cookie = await issue(self, user)
        made.extend([cookie, login.id])
        return login, cookie

    patch.setattr(SessionKeys, "generate", classmethod(observed_generate))
    patch.setattr(LoginRegistry, "issue", observed_issue)
    yield
    patch.undo()
    logging.getLogger().removeHandler(recorder)
    for directory in STATE_DIRS:
        for name in ("store-key", "ssh_host_ed25519_key"):
            if (directory / name).exists():
                data = (directory / name).read_bytes()
                made.extend(private_key_fragments(data) if b"PRIVATE KEY" in data else [data])
    leaks = find_secrets(recorder.lines, [*PASSWORDS, *made])
    assert not leaks, f"secrets in log lines: {leaks[:5]}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Callable[[], Path]:
    """New state dirs for gateways, registered for the leak check."""

    def make() -> Path:
        path = tmp_path / f"state{len(STATE_DIRS)}"
        STATE_DIRS.append(path)
        return path

    return make


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.ping()
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"session image {TEST_IMAGE} missing: run `make image` (see README)")
    except docker.errors.DockerException as exc:
        pytest.fail(f"Docker engine unreachable: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def pam_service() -> Iterator[str]:
    """The shipped etc/pam.d/termbridge, installed under a test service name."""
    target = Path("/etc/pam.d") / PAM_SERVICE
    shutil.copyfile(ROOT / "etc" / "pam.d" / "termbridge", target)
    yield PAM_SERVICE
    target.unlink(missing_ok=True)


@pytest.fixture
def make_user() -> Iterator[Callable[..., HostUser]]:
    made: list[HostUser] = []

    def make(**kwargs: Any) -> HostUser:
        user = create_user(**kwargs)
        made.append(user)
        return user

    yield make
    for user in made:
        delete_user(user)


@pytest.fixture
def make_group() -> Iterator[Callable[[], str]]:
    """Real host groups (`groupadd`), removed after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(create_group())
        return made[-1]

    yield make
    for name in made:
        delete_group(name)


@pytest.fixture
def user(make_user: Callable[..., HostUser]) -> HostUser:
    return make_user()


@pytest.fixture
async def start_gateway(
    tmp_path: Path, pam_service: str, docker_engine: docker.DockerClient, state_dir: Callable[[], Path]
) -> AsyncIterator[Callable[..., Any]]:
    """Starts real gateways in this process on 127.0.0.1:0; each is shut down after the test."""
    runners: list[web.AppRunner] = []

    async def start(backend: Any = None, **sections: dict[str, Any]) -> Gateway:
        path = write_config(tmp_path / f"gw{len(runners)}.toml", state_dir(), pam_service, **sections)
        config = load_config(path, env={})
        app = build_app(config, backend=backend, web_root=ROOT / "web")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return Gateway(f"http://{host}:{port}", config, app, path)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def gateway(start_gateway: Callable[..., Any]) -> Gateway:
    return await start_gateway()


@pytest.fixture
def gateway_process(
    tmp_path: Path, pam_service: str, docker_engine: docker.DockerClient, state_dir: Callable[[], Path]
) -> Iterator[Callable[..., GatewayProcess]]:
    """`termbridge serve` as real processes (not started yet: call `.start()`), stopped after."""
    made: list[GatewayProcess] = []

    def make(**sections: dict[str, Any]) -> GatewayProcess:
        port = free_port()
        sections["web"] = {**sections.get("web", {}), "listen": f"127.0.0.1:{port}"}
        path = write_config(tmp_path / f"process{len(made)}.toml", state_dir(), pam_service, **sections)
        made.append(GatewayProcess(path, port))
        return made[-1]

    yield make
    for process in made:
        process.stop()


@pytest.fixture
async def pw() -> AsyncIterator[Any]:
    """A playwright driver (its `devices` table emulates phones)."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (`make test` does)")
    async with async_playwright() as driver:
        yield driver


@pytest.fixture
async def browser(pw: Any) -> AsyncIterator[Any]:
    chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
    yield chromium
    await chromium.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the run (started on first use)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    assert redis_server.command("FLUSHALL") == "+OK"
    return redis_server.url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """TB_SWARM=0 skips the tests that need the three-node Swarm (CI runs them)."""
    if os.environ.get("TB_SWARM") != "0":
        return
    skip = pytest.mark.skip(reason="TB_SWARM=0: the Swarm cluster tests are skipped")
    for item in items:
        if "swarm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def swarm_cluster(docker_engine: docker.DockerClient) -> Iterator[SwarmCluster]:
    """One manager and two workers (docker-in-docker) with the session image loaded; at the end no
    session service, secret or container may be left on any engine, and the cluster goes (unless
    TB_SWARM_KEEP=1)."""
    cluster = SwarmCluster()
    try:
        cluster.start(images=[TEST_IMAGE])
    except BaseException:
        cluster.close()
        raise
    logging.getLogger("testbed.swarm").warning("swarm cluster start took %.1f s", cluster.start_seconds)
    try:
        yield cluster
        cluster.wait_gone()
        leftovers = cluster.leftovers()
    finally:
        cluster.close()
    assert not leftovers, f"left in the swarm: {leftovers}"
