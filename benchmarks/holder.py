"""What the session holder costs: keystroke echo and throughput straight through sshd's pty
versus through `tb-holder attach` (sshd's pty → the holder → the shell's pty), same image, same
container limits, interleaved rounds.

    python -m benchmarks.holder --image termbridge/session:<tag> [--echo-samples 200] [--megabytes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from typing import Any

from bridge.config import SessionConfig

from .compare import Comparison
from .harness import machine, run_label
from .systems import FloorSsh, HolderSsh

BENCH_UID = 4242  # a host uid for the container's account (no host account is needed here)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.holder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=SessionConfig().image, help="session image with tb-holder")
    parser.add_argument("--runs", type=int, default=3, help="connect→prompt and close→gone samples per system")
    parser.add_argument("--echo-samples", type=int, default=200, help="keystroke echoes per system")
    parser.add_argument("--megabytes", type=float, default=50, help="base64 output per throughput run, MB")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per system, median reported")
    return parser.parse_args(argv)


def cost(results: dict[str, Any]) -> dict[str, float]:
    """The holder's cost in percent (positive: worse) on median and p99 echo and on throughput."""
    direct, held = results[FloorSsh.key], results[HolderSsh.key]
    pct = lambda new, old: round((new - old) / old * 100, 1)  # noqa: E731
    return {
        "echo_median_pct": pct(held["echo"]["median_ms"], direct["echo"]["median_ms"]),
        "echo_p99_pct": pct(held["echo"]["p99_ms"], direct["echo"]["p99_ms"]),
        "throughput_pct": -pct(held["throughput"]["mb_per_s"], direct["throughput"]["mb_per_s"]),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = replace(SessionConfig(), image=args.image)
    label = run_label()
    systems = [FloorSsh(cfg, label, "bench", BENCH_UID), HolderSsh(cfg, label, "bench", BENCH_UID)]
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    results = await Comparison(systems, say).run(args.runs, args.echo_samples, args.megabytes, args.rounds, True)
    out: dict[str, Any] = {"machine": machine(), "image": args.image, "cpus": cfg.cpus, "results": results}
    if all(s.key in results and "echo" in results[s.key] for s in systems):
        out["holder_cost"] = cost(results)
    return out


def main(argv: list[str] | None = None) -> int:
    out = asyncio.run(run(parse_args(argv)))
    print(json.dumps(out, indent=2))
    return 0 if "holder_cost" in out else 1


if __name__ == "__main__":
    raise SystemExit(main())
