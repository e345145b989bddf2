"""Fixtures shared by the suite. Everything here is real: Docker, PAM accounts, the gateway."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from aiohttp import web

from bridge.app import build_app
from bridge.config import Config, load_config
from helpers import ROOT, HostUser, Terminal, create_user, delete_user, session_containers, write_config

PAM_SERVICE = "termbridge-test"
IMAGE = "termbridge/session:latest"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_containers() -> Iterator[None]:
    """Fails the run if any session container outlives the suite (and cleans it up)."""
    yield
    leftovers = session_containers()
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"leaked session containers: {[c.name for c in leftovers]}"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"session image {IMAGE} missing: run `make image` (see README)")
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
def user(make_user: Callable[..., HostUser]) -> HostUser:
    return make_user()


@dataclass
class Gateway:
    url: str
    config: Config
    app: web.Application

    @property
    def origin(self) -> str:
        return self.url

    async def login(self, user: HostUser, password: str | None = None) -> aiohttp.ClientSession:
        """A client session holding the login cookie (raises if the login fails)."""
        http = aiohttp.ClientSession(base_url=self.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
        resp = await http.post(
            "/login",
            data={"username": user.name, "password": password or user.password},
            headers={"Origin": self.origin},
            allow_redirects=False,
        )
        if resp.status != 303:
            await http.close()
            raise AssertionError(f"login of {user.name} failed: {resp.status}")
        return http

    async def terminal(self, http: aiohttp.ClientSession, path: str = "/ws", cols: int = 80, rows: int = 24) -> Terminal:
        ws = await http.ws_connect(path, headers={"Origin": self.origin}, max_msg_size=0)
        term = Terminal(ws)
        await term.resize(cols, rows)
        return term


@pytest.fixture
async def start_gateway(
    tmp_path: Path, pam_service: str, docker_engine: docker.DockerClient
) -> AsyncIterator[Callable[..., Any]]:
    """Starts real gateways in this process on 127.0.0.1:0; each is shut down after the test."""
    runners: list[web.AppRunner] = []

    async def start(**sections: dict[str, Any]) -> Gateway:
        state = tmp_path / f"state{len(runners)}"
        path = write_config(tmp_path / f"gw{len(runners)}.toml", state, pam_service, **sections)
        config = load_config(path, env={})
        app = build_app(config, web_root=ROOT / "web")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return Gateway(f"http://{host}:{port}", config, app)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def gateway(start_gateway: Callable[..., Any]) -> Gateway:
    return await start_gateway()


def docker_ps(*args: str) -> str:
    return subprocess.run(["docker", "ps", "-a", *args], check=True, capture_output=True, text=True).stdout
