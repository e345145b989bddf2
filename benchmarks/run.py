"""termbridge against ttyd and the Docker floor, in one run on one machine.

    .venv/bin/python -m benchmarks [--quick] [--sessions N] [--json FILE]

Measures, for termbridge's web door and SSH door, connect→prompt (cold, and with `session.pool`),
keystroke echo round trips, throughput of 50 MB of base64 and close→container gone; the same
for the floors (docker SDK attach; asyncssh straight into the container's sshd) and for ttyd
running `docker run -it --rm`, all with the same image and limits. Then the scale run. Prints
one table with ratios and writes JSON.

Needs what the tests need (root, Docker, the session image). It creates a throwaway PAM account
and removes it, talks only to loopback and its own containers, and removes every container it
started. `--quick` is what the test suite runs: a few iterations, a small scale run, and ttyd
only if it was built before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bridge.backends.base import LABEL_GATEWAY
from bridge.config import load_config

from . import burst, history, profile, report, ttyd, watch
from .clients import echo_round_trips, throughput
from .compare import Comparison
from .harness import (
    BENCH_LABEL, ROOT, GatewayProcess, bench_account, login, machine, pool_filled, remove_labelled,
    run_label, summary, workdir,
)
from .scale import run_scale
from .systems import (
    KIND_LABEL, FloorAttach, FloorSsh, SshDoor, SshDoorOpenSsh, System, Ttyd, WebDoor, docker_run_command,
)

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few iterations, small scale run (the test suite's mode)")
    parser.add_argument("--runs", type=int, help="connect→prompt and close→gone samples per system (default 10; quick 2)")
    parser.add_argument("--echo-samples", type=int, help="keystroke echo samples (default 200; quick 20)")
    parser.add_argument("--megabytes", type=float, help="base64 output for throughput, MB (default 50; quick 2)")
    parser.add_argument("--rounds", type=int, help="throughput runs per system, median reported (default 3; quick 1)")
    parser.add_argument("--pool", type=int, default=2, help="session.pool of the pooled gateway (default 2)")
    parser.add_argument("--sessions", type=int, help="live sessions in the scale run (default 100; quick 4; 0 skips it)")
    parser.add_argument("--streaming", type=int, help="of which streaming output (default 10; quick 1)")
    parser.add_argument("--stream-rate", type=float, default=100.0,
                        help="kB/s each streaming session prints; 0 = as fast as it can (default 100)")
    parser.add_argument("--probes", type=int, help="echo probes on idle sessions in the scale run (default 500; quick 20)")
    parser.add_argument("--only", choices=("compare", "scale"), help="only the comparison table, or only the scale run")
    parser.add_argument("--systems", type=lambda v: [x for x in v.split(",") if x], default=list(report.COLUMNS),
                        help=f"comma-separated columns to measure (default all: {','.join(report.COLUMNS)})")
    parser.add_argument("--no-ttyd", action="store_true", help="skip the ttyd column")
    parser.add_argument("--build-ttyd", action=argparse.BooleanOptionalAction, default=None,
                        help="build ttyd from Debian's source package if missing (default: yes, not in --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, sample the gateway with py-spy during one more echo and throughput run per door")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (gateway logs) after a successful run")
    parser.add_argument("--json", type=Path, help="write results here (default benchmarks/results/bench-<time>.json)")
    parser.add_argument("--history", type=Path, default=history.HISTORY,
                        help="results history this run is appended to (default benchmarks/results/history.jsonl)")
    args = parser.parse_args(argv)
    if args.profile and profile.py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    quick = args.quick
    defaults = {"runs": (10, 2), "rounds": (3, 1), "echo_samples": (200, 20), "megabytes": (50.0, 2.0), "sessions": (100, 4),
                "streaming": (10, 1), "probes": (500, 20), "build_ttyd": (True, False)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    unknown = set(args.systems) - set(report.COLUMNS)
    if unknown:
        parser.error(f"unknown --systems {','.join(sorted(unknown))}; choose from {','.join(report.COLUMNS)}")
    if args.only == "compare":
        args.sessions = 0
    if args.sessions and args.streaming >= args.sessions:
        parser.error("--streaming must be less than --sessions (idle sessions are probed)")
    return args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def profiled(args: argparse.Namespace, system: System, phase: str, into: dict[str, Any]) -> Iterator[None]:
    """With --profile, py-spy samples the gateway (the doors only) while the block runs."""
    gateway = getattr(system, "gateway", None)
    if not args.profile or gateway is None:
        yield
        return
    out = gateway.workdir / f"profile-{system.key}-{phase}.txt"
    with profile.record(gateway.pid, out):
        yield
    into[phase] = profile.hot_spots(out)
    say(f"{system.title}: {phase} profile: {out}")


async def measure_pool(system: System, gateway: GatewayProcess, args: argparse.Namespace) -> dict[str, Any]:
    say(f"{system.title} with session.pool={args.pool}: {args.runs} sessions")
    await system.setup()
    connect, gone = [], []
    try:
        for _ in range(args.runs):
            if not await pool_filled(gateway.instance_id, args.pool, 60):
                raise RuntimeError("the pool did not refill within 60 s")
            opened = await system.open()
            connect.append(opened.connect_seconds)
            gone.append(await system.close(opened))
        return {"pool_connect": summary(connect), "pool_close_gone": summary(gone)}
    except Exception as exc:
        say(f"{system.title} (pool): FAILED: {exc!r}")
        return {"pool_error": repr(exc)}
    finally:
        await system.teardown()


def ttyd_binary(args: argparse.Namespace) -> tuple[Path | None, str]:
    """ttyd's path, or why its column is skipped."""
    if args.no_ttyd:
        return None, "skipped (--no-ttyd)"
    found = ttyd.find()
    if found:
        return found, ""
    if not args.build_ttyd:
        return None, "skipped (ttyd not built; a full run builds it)"
    try:
        return ttyd.build(say), ""
    except Exception as exc:
        say(f"ttyd: cannot build it: {exc}")
        return None, "skipped (ttyd could not be built; see the log)"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = run_label()
    base = workdir()
    results: dict[str, Any] = {
        "command": args.command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": run_id,
        "workdir": str(base),
        "settings": {k: getattr(args, k) for k in (
            "runs", "echo_samples", "megabytes", "rounds", "pool", "sessions", "streaming", "stream_rate", "probes")},
        "machine_before": machine(),
        "systems": {},
    }
    systems: dict[str, Any] = results["systems"]
    scale_sessions = max(args.sessions, 1)
    limits = {"max_total": max(50, scale_sessions + 10), "max_per_user": scale_sessions + 10, "idle_timeout": "1h"}
    with bench_account() as (pam_service, user):
        gateway = GatewayProcess(base / "gateway", pam_service, {"session": {**limits, "pool": 0}}, with_ssh=True).start()
        results["gateways"] = [gateway.instance_id]
        cfg = load_config(base / "gateway" / "termbridge.toml", env={}).session
        results["session_limits"] = {"image": cfg.image, "cpus": cfg.cpus, "memory": cfg.memory, "pids": cfg.pids,
                                     "network": cfg.network}
        http = await login(gateway.url, user)
        try:
            if args.only != "scale":
                await compare(args, base, run_id, gateway, http, user, cfg, systems)
                await run_pool(args, base, pam_service, limits, user, systems, results)
            if args.sessions:
                say(f"scale: {args.sessions} live sessions, {args.streaming} streaming")
                floor = FloorSsh(cfg, run_id, user.name)
                try:
                    results["scale"] = await run_scale(
                        gateway, user, args.sessions, args.streaming, args.stream_rate, args.probes, say=say,
                        floor=floor, floor_sessions=min(5, args.sessions),
                    )
                except Exception as exc:
                    say(f"scale: FAILED: {exc!r}")
                    results["scale"] = {"error": repr(exc)}
                finally:
                    await floor.teardown()
        finally:
            await http.close()
            gateway.stop()
            leftovers = remove_labelled(**{BENCH_LABEL: run_id}) + remove_labelled(**{LABEL_GATEWAY: f"bench-{run_id}"})
            for instance in results["gateways"]:
                leftovers += remove_labelled(**{LABEL_GATEWAY: instance})
            if leftovers:
                say(f"removed {leftovers} leftover container(s)")
    results["machine_after"] = machine()
    results["targets"] = report.targets(results)
    return results


async def compare(args, base, run_id, gateway, http, user, cfg, systems) -> None:
    """Every system in --systems side by side (interleaved: see compare.py), then, with
    --profile, the doors once more under py-spy (unmeasured, so sampling perturbs no number)."""
    wanted = set(args.systems)
    chosen: list[System] = []
    if "web" in wanted:
        chosen.append(WebDoor(gateway, http))
    if "ssh" in wanted:
        chosen.append(SshDoor(gateway, user))
    if "ssh_openssh" in wanted:
        chosen.append(SshDoorOpenSsh(gateway, user))
    if "floor_attach" in wanted:
        chosen.append(FloorAttach(cfg, run_id))
    if "floor_ssh" in wanted:
        chosen.append(FloorSsh(cfg, run_id, user.name))
    server = None
    if "ttyd" in wanted:
        binary, why = ttyd_binary(args)
        if binary is None:
            systems["ttyd"] = {"title": "ttyd + docker run", "skipped": why}
        else:
            command = docker_run_command(cfg, {BENCH_LABEL: run_id, KIND_LABEL: "ttyd"})
            server = ttyd.TtydServer(binary, command, base / "ttyd.log").start()
            chosen.append(Ttyd(server.url, run_id))
    try:
        systems.update(await Comparison(chosen, say).run(
            args.runs, args.echo_samples, args.megabytes, args.rounds, warm_up=not args.quick
        ))
    finally:
        if server is not None:
            server.stop()
    if server is not None and "ttyd" in systems:
        systems["ttyd"].update(version=ttyd.version(server.binary), command=shlex.join(server.command))
    if args.profile:
        for system in chosen:
            if isinstance(system, (WebDoor, SshDoor)) and "error" not in systems[system.key]:
                systems[system.key]["profile"] = await profile_door(system, args)


async def profile_door(system: System, args: argparse.Namespace) -> dict[str, Any]:
    profiles: dict[str, Any] = {}
    await system.setup()
    opened = await system.open()
    try:
        with profiled(args, system, "echo", profiles):
            await echo_round_trips(opened.term, opened.reader, args.echo_samples)
        with profiled(args, system, "throughput", profiles):
            await throughput(opened.term, opened.reader, args.megabytes)
    finally:
        await system.close(opened)
        await system.teardown()
    return profiles


async def run_pool(args, base, pam_service, limits, user, systems, results) -> None:
    """A second gateway with `session.pool`: connect→prompt when a login claims a warm container.
    A pool that holds nothing before the first login is reported as such, not measured."""
    doors = [door for door in ("web", "ssh") if door in args.systems]
    if not doors:
        return
    for door in doors:
        systems.setdefault(door, {})
    if args.pool <= 0:
        for door in doors:
            systems[door]["pool_skipped"] = "n/a (--pool 0)"
        return
    gateway = GatewayProcess(base / "pooled", pam_service, {"session": {**limits, "pool": args.pool}}, with_ssh=True).start()
    results["gateways"].append(gateway.instance_id)
    try:
        wait = 5 if args.quick else 15
        if not await pool_filled(gateway.instance_id, 1, wait):
            say(f"pool: no warm container within {wait} s of the gateway's start")
            for door in doors:
                systems[door]["pool_skipped"] = f"n/a (the pool stayed empty for {wait} s)"
            return
        http = await login(gateway.url, user)
        try:
            if "web" in doors:
                systems["web"].update(await measure_pool(WebDoor(gateway, http), gateway, args))
            if "ssh" in doors:
                systems["ssh"].update(await measure_pool(SshDoor(gateway, user), gateway, args))
        finally:
            await http.close()
    finally:
        gateway.stop()


def report_main(argv: list[str]) -> int:
    """`python -m benchmarks report [--markdown]`: the latest run from the history."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks report",
                                     description="The latest results and their change against the previous comparable run.")
    parser.add_argument("--markdown", action="store_true", help="the README's block: machine, command, table")
    parser.add_argument("--history", type=Path, default=history.HISTORY)
    args = parser.parse_args(argv)
    entries = history.load(args.history)
    print(history.markdown(entries) if args.markdown else history.text(entries))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["burst"]:
        return burst.main(argv[1:])
    if argv[:1] == ["watch"]:
        return watch.main(argv[1:])
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks", *argv])
    results = asyncio.run(run(args))
    path = args.json or ROOT / "benchmarks" / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    history.append(results, "compare", args.history)
    if results["systems"]:
        print(report.table(results))
        print()
    for target in results["targets"]:
        detail = target.get("why") or ", ".join(f"{k} {v}" for k, v in target.items() if k not in ("target", "status"))
        print(f"- {target['status']}: {target['target']} ({detail})")
    if "scale" in results:
        print()
        print(report.scale_text(results["scale"]))
    m = results["machine_before"]
    print(f"\nmachine: {m.get('cpus')} × {m.get('cpu', '?')}, {m.get('mem_total_mb')} MB, Docker {m.get('docker')}; "
          f"load average {m['load_avg']} before, {results['machine_after']['load_avg']} after; "
          f"{m.get('other_containers_running')} other containers running")
    print(f"JSON: {path}; history: {args.history} (`python -m benchmarks report`)")
    failed = [k for k, v in results["systems"].items() if "error" in v or "pool_error" in v]
    failed += ["scale"] if "error" in results.get("scale", {}) else []
    if failed or args.profile or args.keep:
        print(f"gateway logs{' and profiles' if args.profile else ''}: {results['workdir']}")
    else:
        shutil.rmtree(results["workdir"], ignore_errors=True)
    return 1 if failed else 0
