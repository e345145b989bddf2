"""Watch latency: from the owner's keystroke to the admin's screen, through a real gateway process,
PAM accounts, an admin group and a container.

    .venv/bin/python -m benchmarks watch [--samples 200] [--across]

The owner types one key at the prompt on her terminal socket; the time until its echo reaches
an admin's watch socket is one sample (the owner's own echo of the same key is timed beside it);
the key is rubbed out, untimed, and the next one typed. Prints median and p95 and appends the
run to the results history (`python -m benchmarks report` shows the latest).

`--across`: two gateway processes sharing a Redis store (a local redis-server on a loopback
port); the owner's session is served by the first, the admin watches through the second, so
every byte reaches the view through the sealed relay over Redis pub/sub.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from . import history
from .harness import GatewayProcess, bench_account, login, machine, summary, workdir

KEYS = b"abcdefghijklmnopqrstuvwxyz"
TIMEOUT = 10.0


class Watched:
    """Everything one socket received, and a wait for a byte to arrive after a mark."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.data = bytearray()
        self.mark = 0
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.data.extend(msg.data)
                self.arrived.set()

    def forget(self) -> None:
        self.mark = len(self.data)

    async def until(self, needle: bytes) -> float:
        """perf_counter() when `needle` had arrived after the mark."""
        async with asyncio.timeout(TIMEOUT):
            while needle not in self.data[self.mark :]:
                self.arrived.clear()
                await self.arrived.wait()
        return time.perf_counter()


async def measure(url: str, owner, admin, samples: int, admin_url: str = "") -> dict[str, Any]:
    """`admin_url`: the gateway the admin watches through (default: the owner's)."""
    admin_url = admin_url or url
    owner_http, admin_http = await login(url, owner), await login(admin_url, admin)
    try:
        ws = await owner_http.ws_connect("/ws", headers={"Origin": url})
        await ws.send_str('{"type":"resize","cols":80,"rows":24}')
        session_id = None
        while session_id is None:
            msg = await ws.receive(timeout=60)
            if msg.type == aiohttp.WSMsgType.TEXT and '"session"' in msg.data:
                session_id = msg.json()["id"]
        mine = Watched(ws)
        await mine.until(b"$ ")
        view = Watched(await admin_http.ws_connect(f"/admin/watch/{session_id}/ws", headers={"Origin": admin_url}))
        await view.until(b"$ ")
        to_admin, to_owner = [], []
        for i in range(samples):
            key = KEYS[i % 26 : i % 26 + 1]
            mine.forget()
            view.forget()
            t0 = time.perf_counter()
            await ws.send_bytes(key)
            owner_at, admin_at = await asyncio.gather(mine.until(key), view.until(key))
            to_owner.append(owner_at - t0)
            to_admin.append(admin_at - t0)
            mine.forget()
            view.forget()
            await ws.send_bytes(b"\x7f")
            await view.until(b"\x08")
        await ws.send_bytes(b"exit\r")
        await view.ws.close()
        await ws.close()
        return {"owner_keystroke_to_admin_screen": summary(to_admin), "owner_echo": summary(to_owner)}
    finally:
        await owner_http.close()
        await admin_http.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from testbed.accounts import create_group, create_user, delete_group, delete_user
    from testbed.redis_server import RedisServer

    base = workdir()
    results: dict[str, Any] = {"command": args.command, "machine_before": machine(), "workdir": str(base),
                               "settings": {"samples": args.samples, "across": args.across}}
    group = create_group()
    admin = create_user(groups=(group,))
    redis = RedisServer().start() if args.across else None
    sections: dict[str, dict[str, Any]] = {"auth": {"admin_groups": [group]}}
    if redis is not None:
        sections["store"] = {"url": redis.url, "secret_file": str(base / "store-key")}
    gateways: list[GatewayProcess] = []
    try:
        with bench_account() as (service, owner):
            try:
                for name in ("gateway", "watched-through")[: 2 if args.across else 1]:
                    gateways.append(GatewayProcess(base / name, service, sections).start())
                results.update(await measure(gateways[0].url, owner, admin, args.samples, gateways[-1].url))
            finally:
                for gateway in gateways:
                    gateway.stop()
    finally:
        if redis is not None:
            redis.close()
        delete_user(admin)
        delete_group(group)
    results["machine_after"] = machine()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="keystrokes timed (default 200)")
    parser.add_argument("--across", action="store_true",
                        help="the admin watches through a second gateway sharing a Redis store (the relay)")
    parser.add_argument("--history", default=history.HISTORY, type=Path,
                        help="results history this run is appended to")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks", "watch", *argv])
    results = asyncio.run(run(args))
    history.append(results, "watch", args.history)
    print("\n".join(history.watch_lines(results)), file=sys.stdout)
    print(f"history: {args.history}")
    shutil.rmtree(results["workdir"], ignore_errors=True)
    return 0
