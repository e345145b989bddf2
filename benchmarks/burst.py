"""A class starting at once: N people (distinct PAM accounts) log in through the web door in the
same instant, and each is timed from the login POST until the shell's prompt shows on its
WebSocket. Run against a gateway with the pool at each size asked for (0 = cold), and the same
burst against ttyd + `docker run` where ttyd is built.

    .venv/bin/python -m benchmarks burst [--n 30] [--pools 0,30] [--profile]

Every client fetches the login form first, then all wait on one barrier and are released
together: what is timed is the burst, not the clients' own set-up. The host's load average is
recorded before and after each burst, and its CPU busy share during it. The same burst straight
at Docker (create + attach + start, no gateway) is the floor every design that starts containers
on demand pays.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bridge.backends.base import LABEL_GATEWAY
from bridge.config import load_config

from testbed.gateway import write_config

from . import history, profile, ttyd
from .clients import Reader, TtydTerm, WebTerm
from .harness import (
    BENCH_LABEL, PROMPT, GatewayProcess, HostUser, bench_account, cpu_times, machine, pool_filled, remove_labelled,
    run_label, summary, workdir,
)
from .systems import KIND_LABEL, FloorAttach, docker_run_command

PROMPT_TIMEOUT = 120.0  # a cold burst of 30 on 2 cores takes tens of seconds; failing is worse
Login = Callable[[asyncio.Barrier], Awaitable[tuple[float, Any]]]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="logins released together (default 30)")
    parser.add_argument("--pools", type=lambda v: [int(x) for x in v.split(",") if x],
                        help="session.pool sizes to burst against, comma-separated (default 0 and N)")
    parser.add_argument("--one-address", action="store_true",
                        help="every login from 127.0.0.1 (a lab behind one NAT address) instead of one address each")
    parser.add_argument("--no-ttyd", action="store_true", help="skip the ttyd burst")
    parser.add_argument("--profile", action="store_true", help="sample the gateway with py-spy during the cold burst")
    parser.add_argument("--history", type=Path, default=history.HISTORY, help="results history to append to")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (gateway logs, profiles)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.pools is None:
        args.pools = [0, args.n]
    if args.profile and profile.py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    return args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def source_address(i: int, one_address: bool) -> str:
    """Each client its own loopback address (127.0.1.x, all routed to lo), as the machines of a
    lab have theirs: the gateway's per-address throttle then sees a class, not one flood."""
    return "127.0.0.1" if one_address else f"127.0.{1 + i // 250}.{1 + i % 250}"


async def web_login(url: str, user: HostUser, source: str, barrier: asyncio.Barrier) -> tuple[float, Any]:
    """Fetch the form, wait for everyone, then POST the login and open the terminal; seconds
    from the POST to the prompt."""
    http = aiohttp.ClientSession(base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(local_addr=(source, 0)))
    try:
        async with http.get("/login") as form:
            token = re.search(r'name="csrf" value="([^"]+)"', await form.text())
        await barrier.wait()
        t0 = time.perf_counter()
        async with http.post(
            "/login", data={"username": user.name, "password": user.password, "csrf": token.group(1) if token else ""},
            headers={"Origin": url}, allow_redirects=False,
        ) as resp:
            if resp.status != 303:
                raise RuntimeError(f"login of {user.name}: HTTP {resp.status}")
        term = await WebTerm.connect(http, url)
        await Reader(term).until(PROMPT, timeout=PROMPT_TIMEOUT)
        return time.perf_counter() - t0, (http, term)
    except BaseException:
        await http.close()
        raise


async def ttyd_login(url: str, barrier: asyncio.Barrier) -> tuple[float, Any]:
    """ttyd has no login: connect→prompt, released together like the web door's logins."""
    http = aiohttp.ClientSession()
    try:
        await barrier.wait()
        t0 = time.perf_counter()
        term = await TtydTerm.connect(http, url)
        await Reader(term).until(PROMPT, timeout=PROMPT_TIMEOUT)
        return time.perf_counter() - t0, (http, term)
    except BaseException:
        await http.close()
        raise


def phases(log: Path, released: float) -> dict[str, Any]:
    """Where a burst's time went, from the gateway's audit log: release → PAM said yes (the
    login's queue for PAM workers and the hashing), and each session's container start."""
    logged_in, startup = [], []
    for line in log.read_text(errors="replace").splitlines():
        _, _, payload = line.partition(" INFO termbridge.audit: ")
        if not payload:
            continue
        event = json.loads(payload)
        if event.get("event") == "login" and event.get("ok"):
            when = datetime.datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
            logged_in.append(max(0.0, when.timestamp() - released))
        elif event.get("event") == "session_start" and "startup_ms" in event:
            startup.append(event["startup_ms"] / 1000)
    return {"release_to_pam_ok": summary(logged_in), "session_startup": summary(startup)}


async def floor_login(floor: FloorAttach, barrier: asyncio.Barrier) -> tuple[float, Any]:
    """The Docker floor: create + attach + start `bash -l` with the session's limits, no gateway."""
    await barrier.wait()
    opened = await floor.open()
    return opened.connect_seconds, (None, opened.term)


async def release(label: str, logins: list[Login], log: Path | None = None) -> dict[str, Any]:
    """Run every login at once (an asyncio barrier releases them together); time, failures, load."""
    barrier = asyncio.Barrier(len(logins) + 1)
    waiting = asyncio.gather(*(one(barrier) for one in logins), return_exceptions=True)
    while barrier.n_waiting < len(logins):  # every client has its form: release them
        await asyncio.sleep(0.01)
    load_before = [round(x, 2) for x in os.getloadavg()]
    busy0, total0 = cpu_times()
    released = time.time()
    t0 = time.perf_counter()
    await barrier.wait()
    outcomes = await waiting
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_times()
    times = [o[0] for o in outcomes if isinstance(o, tuple)]
    errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    for outcome in outcomes:
        if isinstance(outcome, tuple):
            http, term = outcome[1]
            await term.send(b"exit\r")  # the session ends as a person ends it; its container goes
            await term.close()
            if http is not None:
                await http.close()
    result = {
        "label": label, "n": len(logins), "failed": len(errors), "errors": sorted(set(errors))[:5],
        "login_prompt": summary(times), "all_done_s": round(wall, 2),
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "host_cpu_busy_percent": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        **(phases(log, released) if log is not None else {}),
    }
    t = result["login_prompt"]
    say(f"{label}: p50 {t.get('median_ms')} ms, p95 {t.get('p95_ms')} ms, max {t.get('max_ms')} ms; "
        f"{len(errors)} failed; load {load_before} → {result['load_after']}")
    if log is not None:
        p, st = result["release_to_pam_ok"], result["session_startup"]
        say(f"  release→PAM ok: p50 {p.get('median_ms')} ms, max {p.get('max_ms')} ms; "
            f"session start: p50 {st.get('median_ms')} ms, max {st.get('max_ms')} ms")
    for error in result["errors"]:
        say(f"  failure: {error}")
    return result


async def gateway_burst(args: argparse.Namespace, base: Path, service: str, users: list[HostUser], pool: int,
                        gateways: list[str]) -> dict[str, Any]:
    n = len(users)
    limits = {"max_total": 2 * n + pool + 10, "max_per_user": 2, "idle_timeout": "1h", "pool": pool}
    gateway = GatewayProcess(base / f"pool-{pool}", service, {"session": limits}).start()
    gateways.append(gateway.instance_id)
    label = f"web door, pool {pool}"
    try:
        if pool and not await pool_filled(gateway.instance_id, pool, 60 + 5 * pool):
            return {"label": label, "n": n, "skipped": f"the pool did not fill to {pool} in time"}
        logins = [lambda b, u=u, i=i: web_login(gateway.url, u, source_address(i, args.one_address), b)
                  for i, u in enumerate(users)]
        if args.profile and pool == 0:
            out = gateway.workdir / "profile-burst.txt"
            with profile.record(gateway.pid, out):
                result = await release(label, logins, gateway.log_path)
            result["profile"] = profile.hot_spots(out, top=20)
            say(f"{label}: profile {out}")
            return result
        return await release(label, logins, gateway.log_path)
    finally:
        gateway.stop()


async def floor_burst(base: Path, run_id: str, n: int) -> dict[str, Any]:
    """The same burst straight at Docker (what `docker run` costs when N start at once): the
    reference when ttyd is not built, and what any design starting containers on demand pays."""
    cfg = load_config(base / "gateway.toml", env={}).session
    floor = FloorAttach(cfg, run_id)
    try:
        return await release("floor: docker attach", [lambda b: floor_login(floor, b) for _ in range(n)])
    finally:
        await floor.teardown()


async def ttyd_burst(args: argparse.Namespace, base: Path, run_id: str, n: int) -> dict[str, Any]:
    label = "ttyd + docker run"
    binary = None if args.no_ttyd else ttyd.find()
    if binary is None:
        why = "--no-ttyd" if args.no_ttyd else "ttyd is not built on this machine (`python -m benchmarks` builds it)"
        return {"label": label, "n": n, "skipped": f"skipped ({why})"}
    cfg = load_config(base / "gateway.toml", env={}).session
    server = ttyd.TtydServer(binary, docker_run_command(cfg, {BENCH_LABEL: run_id, KIND_LABEL: "ttyd"}),
                             base / "ttyd.log").start()
    try:
        result = await release(label, [lambda b: ttyd_login(server.url, b) for _ in range(n)])
        result["version"] = ttyd.version(binary)
        return result
    finally:
        server.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = run_label()
    base = workdir()
    results: dict[str, Any] = {
        "command": args.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run_id,
        "workdir": str(base), "settings": {"n": args.n, "pools": args.pools, "one_address": args.one_address}, "machine_before": machine(),
        "bursts": [], "gateways": [],
    }
    with bench_account() as (service, first):
        from testbed.accounts import create_user, delete_user

        users = [first] + [create_user() for _ in range(args.n - 1)]
        try:
            for pool in args.pools:
                say(f"burst: {args.n} logins, session.pool={pool}")
                results["bursts"].append(await gateway_burst(args, base, service, users, pool, results["gateways"]))
            write_config(base / "gateway.toml", base / "state", service)  # the session limits the gateways get
            say(f"burst: {args.n} × docker create + attach + start (the floor)")
            results["bursts"].append(await floor_burst(base, run_id, args.n))
            say(f"burst: {args.n} × ttyd + docker run")
            results["bursts"].append(await ttyd_burst(args, base, run_id, args.n))
        finally:
            for user in users[1:]:
                delete_user(user)
            leftovers = remove_labelled(**{BENCH_LABEL: run_id})
            for instance in results["gateways"]:
                leftovers += remove_labelled(**{LABEL_GATEWAY: instance})
            if leftovers:
                say(f"removed {leftovers} leftover container(s)")
    results["machine_after"] = machine()
    results["targets"] = targets(results)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """p95 with the pool sized to the burst within 1.0× ttyd's p95, and no failed login."""
    n = results["settings"]["n"]
    name = f"burst of {n}: p95 with session.pool={n} ≤ 1.0× ttyd's p95, no failed login"
    sized = next((b for b in results["bursts"] if b["label"] == f"web door, pool {n}"), None)
    theirs = next((b for b in results["bursts"] if b["label"].startswith("ttyd")), None)
    failed = sum(b.get("failed", 0) for b in results["bursts"] if b["label"].startswith("web"))
    if sized is None or "skipped" in sized or theirs is None or "skipped" in theirs:
        why = (sized or {}).get("skipped") or (theirs or {}).get("skipped") or f"no burst with session.pool={n}"
        return [{"target": name, "status": "not judged", "why": why, "web_failed": failed}]
    ratio = sized["login_prompt"]["p95_ms"] / theirs["login_prompt"]["p95_ms"]
    met = ratio <= 1.0 and failed == 0
    return [{"target": name, "status": "met" if met else "MISSED", "ratio": round(ratio, 2), "web_failed": failed}]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "benchmarks", "burst", *argv])
    results = asyncio.run(run(args))
    history.append(results, "burst", args.history)
    print("\n".join(history.burst_lines(results, None)))
    for target in results["targets"]:
        detail = target.get("why") or f"ratio {target['ratio']}"
        print(f"- {target['status']}: {target['target']} ({detail}; {target['web_failed']} web logins failed)")
    for burst in results["bursts"]:
        if "profile" in burst:
            print(f"\nprofile of the cold burst ({burst['profile']['samples']} samples), share of samples:")
            for pct, name in burst["profile"]["total_percent"]:
                print(f"  {pct:5.1f}%  {name}")
    print(f"history: {args.history}")
    failed = any(b.get("failed") for b in results["bursts"])
    if failed or args.profile or args.keep:
        print(f"gateway logs{' and profile' if args.profile else ''}: {results['workdir']}")
    else:
        shutil.rmtree(results["workdir"], ignore_errors=True)
    return 1 if failed else 0
