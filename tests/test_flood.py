"""One person flooding the gateway with starts they abandon at once (web and SSH doors): a start
counts against the caps until its container is gone, and nobody else waits for it. A real
gateway process, real WebSocket and SSH clients, real containers; `docker ps` is the judge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncssh

from helpers import PROMPT, GatewayProcess, HostUser, containers_gone, free_port, session_containers

MAX_PER_USER = 3
FLOOD = 45  # sockets opened and abandoned by one person
FLOOD_SECONDS = 2.0
PROMPT_CEILING = 10.0  # a generous bound on the other person's login→prompt during the flood


class Sampler:
    """Counts the flooding user's containers with `docker ps` until stopped; keeps the peak."""

    def __init__(self, username: str) -> None:
        self.username = username
        self.peak = 0
        self.samples = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            found = await asyncio.to_thread(session_containers, **{"termbridge.user": self.username})
            self.peak = max(self.peak, len(found))
            self.samples += 1
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


async def _abandon_sockets(gateway: Any, http: aiohttp.ClientSession, count: int) -> None:
    """Open `count` terminals over FLOOD_SECONDS, each dropped after a few tens of ms (mid-start)."""

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            ws = await http.ws_connect("/ws", headers={"Origin": gateway.origin})
        except aiohttp.ClientError:
            return
        await asyncio.sleep(0.05 + (delay * 7919) % 0.2)
        await ws.close()

    await asyncio.gather(*(one(i * FLOOD_SECONDS / count) for i in range(count)))


async def _flood_while(process: GatewayProcess, flood: Callable[[], Any], username: str,
                       during: Callable[[], Any] | None = None) -> tuple[Sampler, Any]:
    sampler = Sampler(username)
    sampling = asyncio.create_task(sampler.run())
    try:
        results = await asyncio.gather(flood(), during() if during else asyncio.sleep(0))
        await asyncio.sleep(1)
        # The abandoned starts land and are removed meanwhile: sampled until the last is gone.
        await containers_gone(**{"termbridge.user": username})
    finally:
        sampler.stop()
        await sampling
    return sampler, results[1]


def _gateway(gateway_process: Callable[..., GatewayProcess], **sections: Any) -> GatewayProcess:
    return gateway_process(session={"max_per_user": MAX_PER_USER, "max_total": 50, "pool": 0}, **sections)


async def _time_to_prompt(gateway: Any, user: HostUser) -> float:
    began = time.monotonic()
    http = await gateway.login(user)
    try:
        term = await gateway.terminal(http)
        await term.control("session", timeout=60)
        await term.expect(PROMPT, timeout=60)
        took = time.monotonic() - began
        await term.send("exit\r")
        await term.control("exit", timeout=30)
        return took
    finally:
        await http.close()


async def _healthz_statuses(url: str, seconds: float) -> list[int]:
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    statuses.append(resp.status)
            except (aiohttp.ClientError, TimeoutError):
                statuses.append(0)
            await asyncio.sleep(0.25)
    return statuses


async def test_abandoned_web_starts_never_exceed_the_per_user_cap(
    gateway_process: Callable[..., GatewayProcess], make_user: Callable[..., HostUser]
) -> None:
    process = _gateway(gateway_process)
    await process.start()
    flooder = make_user()
    http = await process.gateway.login(flooder)
    try:
        sampler, _ = await _flood_while(process, lambda: _abandon_sockets(process.gateway, http, FLOOD), flooder.name)
    finally:
        await http.close()
    print(f"web flood: peak {sampler.peak} containers of one user over {sampler.samples} samples")
    assert sampler.samples >= 3
    assert sampler.peak <= MAX_PER_USER, f"{sampler.peak} containers of {flooder.name} at once"
    await containers_gone(**{"termbridge.user": flooder.name})


async def test_a_flood_by_one_user_does_not_starve_another(
    gateway_process: Callable[..., GatewayProcess], make_user: Callable[..., HostUser]
) -> None:
    process = _gateway(gateway_process)
    await process.start()
    flooder, other = make_user(), make_user()
    http = await process.gateway.login(flooder)
    health: list[int] = []

    async def other_logs_in() -> float:
        await asyncio.sleep(0.5)  # the flood is under way
        checking = asyncio.create_task(_healthz_statuses(process.gateway.url, FLOOD_SECONDS + 2))
        took = await _time_to_prompt(process.gateway, other)
        health.extend(await checking)
        return took

    try:
        sampler, took = await _flood_while(
            process, lambda: _abandon_sockets(process.gateway, http, FLOOD), flooder.name, other_logs_in
        )
    finally:
        await http.close()
    print(f"login→prompt of another user during the flood: {took:.2f} s; /healthz: {health}; "
          f"flooder's peak {sampler.peak} containers")
    assert took < PROMPT_CEILING
    assert health and set(health) == {200}, health
    assert sampler.peak <= MAX_PER_USER
    await containers_gone(**{"termbridge.user": flooder.name})
    await containers_gone(**{"termbridge.user": other.name})


async def test_abandoned_ssh_logins_never_exceed_the_per_user_cap(
    gateway_process: Callable[..., GatewayProcess], make_user: Callable[..., HostUser]
) -> None:
    port = free_port()
    process = _gateway(gateway_process, ssh={"listen": f"127.0.0.1:{port}"})
    await process.start()
    flooder = make_user()

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            conn = await asyncssh.connect(
                "127.0.0.1", port, username=flooder.name, password=flooder.password, known_hosts=None,
                client_keys=None, preferred_auth="password",
            )
        except (OSError, asyncssh.Error):
            return
        await asyncio.sleep(0.05 + (delay * 7919) % 0.3)
        conn.close()
        await conn.wait_closed()

    async def flood() -> None:
        await asyncio.gather(*(one(i * FLOOD_SECONDS / 40) for i in range(40)))

    sampler, _ = await _flood_while(process, flood, flooder.name)
    print(f"ssh flood: peak {sampler.peak} containers of one user over {sampler.samples} samples")
    assert sampler.samples >= 3
    assert sampler.peak <= MAX_PER_USER, f"{sampler.peak} containers of {flooder.name} at once"
    await containers_gone(**{"termbridge.user": flooder.name})
