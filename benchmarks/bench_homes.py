"""Login-to-prompt with a persistent home against without one, in the same run: two gateways
side by side (session.home = "ephemeral" and "persistent"), one throwaway account, the runs
interleaved so that both see the same load. The first persistent login also makes the home
(fallocate + mkfs): it is reported on its own.

    .venv/bin/python -m benchmarks.bench_homes [--runs N] [--home-size SIZE] [--json FILE]

Needs what the tests need (root, Docker, a session image with the persistent-home feature, e2fsprogs).
It talks only to loopback and its own containers; its homes go with its work directory.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.bench_core import bench_gateways, report, ws_login_to_prompt
from benchmarks.harness import machine, summary
from bridge.config import parse_size
from bridge.homes import HomeStore


def mount_cycles(root: Path, size: int, runs: int) -> tuple[float, list[float], list[float]]:
    """The home store alone, on an image of `size`: making it once, then mount and unmount."""
    homes = HomeStore(root, uid_base=1_000_000_000)
    uid = 65000  # an image file's name only: no account is involved
    t0 = time.perf_counter()
    homes.mount("bench", uid, size)
    made = time.perf_counter() - t0
    homes.unmount(uid, lambda: False)
    mounts, unmounts = [], []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            homes.mount("bench", uid, size)
            mounts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            homes.unmount(uid, lambda: False)
            unmounts.append(time.perf_counter() - t0)
    finally:
        homes.remove(uid, lambda: False)
    return made, mounts, unmounts


async def run(runs: int, home_size: str) -> dict[str, object]:
    configs = {
        "ephemeral": {},
        "persistent": {"session": {"home": "persistent", "home_size": home_size}},
    }
    samples: dict[str, list[float]] = {"ephemeral": [], "persistent": []}
    async with bench_gateways(configs) as (gateways, user):
        first = await ws_login_to_prompt(gateways["persistent"], user, 1)
        for _ in range(runs):
            for name, gateway in gateways.items():
                samples[name] += await ws_login_to_prompt(gateway, user, 1)
    with tempfile.TemporaryDirectory(prefix="tb-bench-homes-") as tmp:
        made, mounts, unmounts = await asyncio.to_thread(mount_cycles, Path(tmp), parse_size(home_size), runs)
    return {
        "machine": machine(),
        "home_store_make_ms": round(made * 1000, 1),
        "home_store_mount": summary(mounts),
        "home_store_unmount": summary(unmounts),
        "home_size": home_size,
        "first_login_making_the_home_ms": round(first[0] * 1000, 1),
        "ws_login_to_prompt_ephemeral": summary(samples["ephemeral"]),
        "ws_login_to_prompt_persistent": summary(samples["persistent"]),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--home-size", default="1g")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report(await run(args.runs, args.home_size), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
