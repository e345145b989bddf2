"""File transfer through the web door: upload and download throughput over SFTP into a real
session container, and how much the gateway's memory grows meanwhile (it streams: the growth
must stay far below the file's size).

    .venv/bin/python -m benchmarks.bench_files [--size-mib N] [--runs N] [--json FILE]

Needs what the tests need (root, Docker, the session image). It creates a throwaway PAM account
and removes it, and talks only to loopback and its own container.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time
from pathlib import Path

from benchmarks.bench_core import bench_gateway, report
from testbed.gateway import PROMPT

BLOCK = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples this process's resident size (the gateway runs in it) every 20 ms."""

    def __init__(self) -> None:
        self.base = rss_bytes()
        self.peak = self.base
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def growth_mib(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


async def run(gateway, user, size_mib: int, runs: int) -> dict[str, object]:
    block = os.urandom(BLOCK)
    expected = hashlib.sha256(block * size_mib).hexdigest()

    async def body():
        for _ in range(size_mib):
            yield block

    up, down, up_growth, down_growth = [], [], [], []
    http = await gateway.login(user)
    try:
        term = await gateway.terminal(http)
        session = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        params = {"session": session, "path": "bench.bin"}
        for _ in range(runs):
            with PeakRss() as rss:
                t0 = time.monotonic()
                resp = await http.put(
                    "/files/upload", params=params, data=body(), headers={"Origin": gateway.origin}
                )
                assert resp.status == 201, await resp.text()
                up.append(size_mib / (time.monotonic() - t0))
            up_growth.append(rss.growth_mib)
            with PeakRss() as rss:
                t0 = time.monotonic()
                resp = await http.get("/files/download", params=params)
                digest = hashlib.sha256()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                down.append(size_mib / (time.monotonic() - t0))
            down_growth.append(rss.growth_mib)
            assert digest.hexdigest() == expected, "downloaded bytes differ"
        await term.send("exit\r")
        await term.control("exit")
    finally:
        await http.close()
    return {
        "file_mib": size_mib,
        "runs": runs,
        "upload_mib_per_s": round(statistics.median(up), 1),
        "download_mib_per_s": round(statistics.median(down), 1),
        "gateway_rss_growth_upload_mib_max": max(up_growth),
        "gateway_rss_growth_download_mib_max": max(down_growth),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    async with bench_gateway() as (gateway, user):
        results = await run(gateway, user, args.size_mib, args.runs)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
