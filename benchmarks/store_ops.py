"""Operations per second of the state store, SQLite and Redis.

    .venv/bin/python -m benchmarks.store_ops [--ops 2000] [--json FILE]

For each backend: reserve_slot + release_slot pairs, put_login and get_login, each one at a time
(one caller's latency) and 50 in flight (a busy gateway). SQLite in a temporary directory; Redis
is a throwaway redis-server on a free loopback port (skipped if redis-server is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bridge.config import Config, StoreConfig
from bridge.store import LoginRecord, Store, open_store
from testbed.redis_server import REDIS_SERVER, RedisServer

IN_FLIGHT = 50


async def _rate(ops: int, concurrent: bool, op: Callable[[int], Awaitable[object]]) -> float:
    started = time.perf_counter()
    if concurrent:
        for first in range(0, ops, IN_FLIGHT):
            await asyncio.gather(*(op(i) for i in range(first, min(ops, first + IN_FLIGHT))))
    else:
        for i in range(ops):
            await op(i)
    return ops / (time.perf_counter() - started)


async def measure(store: Store, ops: int) -> dict[str, float]:
    """ops/s of each operation, serial and with IN_FLIGHT concurrent callers."""
    expires = time.time() + 3600
    now = time.time()
    run = secrets.token_hex(4)  # ids of this run only: nothing else in the store is touched

    async def reserve_release(i: int) -> None:
        await store.reserve_slot(f"bench-{run}-{i}", f"user{i % 100}", 1000, 1_000_000)
        await store.release_slot(f"bench-{run}-{i}")

    async def put_login(i: int) -> None:
        await store.put_login(LoginRecord(f"bench-{run}-login-{i}", f"user{i % 100}", 1000, 1000, expires))

    async def get_login(i: int) -> None:
        await store.get_login(f"bench-{run}-login-{i}", now)

    results = {}
    for name, op in [("reserve+release", reserve_release), ("put_login", put_login), ("get_login", get_login)]:
        for concurrent in (False, True):
            results[f"{name} {'x' + str(IN_FLIGHT) if concurrent else 'serial'}"] = await _rate(ops, concurrent, op)
    for i in range(ops):
        await store.delete_login(f"bench-{run}-login-{i}")
    return results


async def _measure_backend(state_dir: str, url: str, ops: int) -> dict[str, float]:
    store = await open_store(Config(state_dir=Path(state_dir), store=StoreConfig(url=url)))
    try:
        return await measure(store, ops)
    finally:
        await store.close()


async def run(ops: int) -> dict[str, dict[str, float]]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="tb-store-bench-") as state_dir:
        results["sqlite"] = await _measure_backend(state_dir, "", ops)
        if Path(REDIS_SERVER).exists():
            server = RedisServer().start()
            try:
                results["redis"] = await _measure_backend(state_dir, server.url, ops)
            finally:
                server.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement (default 2000)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.ops))
    names = list(next(iter(results.values())))
    print(f"{'ops/s':<24}" + "".join(f"{backend:>12}" for backend in results))
    for name in names:
        print(f"{name:<24}" + "".join(f"{results[backend][name]:>12.0f}" for backend in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
