"""The Swarm backend against the Docker backend, in one run: login→prompt and keystroke echo
through the web door for sessions on one Docker engine (a gateway process on this host), and for
sessions as Swarm services on the test cluster (testbed/swarm.py: three docker-in-docker nodes),
with the session on the gateway's own node and on another node; then how N sessions spread
over the nodes and what one idle session holds on its node.

    python -m benchmarks.swarm [--runs 5] [--echo-samples 100] [--sessions 9] [--image TAG]

The swarm numbers include the stack's nginx front (etc/swarm/) and the nodes' vfs storage driver
(the only one that works nested here): they are an upper bound for a real cluster. Needs root,
Docker and the images the tests use; talks only to loopback, its own containers and the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from testbed.accounts import HostUser
from testbed.gateway import TEST_IMAGE
from testbed.stack import Stack
from testbed.swarm import SwarmCluster

from . import history
from .clients import Reader, WebTerm, echo_round_trips
from .harness import PROMPT, GatewayProcess, bench_account, login, machine, summary, workdir

SWARM_TOML = Path(__file__).resolve().parent.parent / "etc" / "swarm" / "termbridge.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swarm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=TEST_IMAGE, help="session image (loaded into every node)")
    parser.add_argument("--runs", type=int, default=5, help="login→prompt samples per system")
    parser.add_argument("--echo-samples", type=int, default=100, help="keystroke echoes per system")
    parser.add_argument("--sessions", type=int, default=9, help="sessions opened at once to see how they spread")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(text, file=sys.stderr)


async def measure(url: str, user: HostUser, runs: int, echoes: int) -> dict[str, Any]:
    """Login→prompt `runs` times (a fresh session each), then echoes in one more session."""
    times = []
    http = await login(url, user)
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            term = await WebTerm.connect(http, url)
            await Reader(term).until(PROMPT, timeout=120)
            times.append(time.perf_counter() - t0)
            await term.send(b"exit\r")
            await term.close()
        term = await WebTerm.connect(http, url)
        reader = Reader(term)
        await reader.until(PROMPT, timeout=120)
        echo = await echo_round_trips(term, reader, echoes)
        await term.send(b"exit\r")
        await term.close()
    finally:
        await http.close()
    return {"login_to_prompt": summary(times), "echo": summary(echo)}


def stack_config(path: Path, image: str, placement: list[str], per_user: int = 3) -> Path:
    text = SWARM_TOML.read_text().replace('image = "termbridge/session:latest"', f'image = "{image}"')
    text = text.replace('placement = ["node.labels.termbridge==yes"]', f"placement = {json.dumps(placement)}")
    extra = f'start_timeout = "120s"\nmax_per_user = {per_user}\nmax_total = {max(per_user, 50)}\n'
    path.write_text(text.replace("[session]\n", "[session]\n" + extra))
    return path


async def spread(stack: Stack, user: HostUser, sessions: int) -> dict[str, Any]:
    """Open `sessions` at once with no placement constraint: sessions per node, and the memory
    one idle session's container holds on its node (cgroup usage, from the node's engine)."""
    http = await login(stack.web_url, user)
    terms = []
    try:
        for _ in range(sessions):
            term = await WebTerm.connect(http, stack.web_url)
            await Reader(term).until(PROMPT, timeout=120)
            terms.append(term)
        per_node: Counter[str] = Counter()
        memory = []
        for node in stack.cluster.nodes:
            containers = node.client().containers.list(filters={"label": "termbridge.session"})
            per_node[node.name] += len(containers)
            for container in containers:
                memory.append(container.stats(stream=False)["memory_stats"].get("usage", 0) / 2**20)
    finally:
        for term in terms:
            await term.send(b"exit\r")
            await term.close()
        await http.close()
    return {
        "sessions": sessions,
        "per_node": dict(per_node),
        "idle_session_mib": round(sorted(memory)[len(memory) // 2], 1) if memory else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine_before": machine(), "image": args.image, "systems": {}}
    base = workdir() / "swarm"
    shutil.rmtree(base, ignore_errors=True)
    with bench_account() as (service, user):
        gateway = GatewayProcess(base / "docker", service, {"session": {"image": args.image}}).start()
        try:
            say("docker backend: gateway process on this host")
            out["systems"]["docker"] = await measure(gateway.url, user, args.runs, args.echo_samples)
            say(json.dumps(out["systems"]["docker"]))
        finally:
            gateway.stop()
        cluster = SwarmCluster()
        began = time.monotonic()
        cluster.start(images=[args.image])
        try:
            manager = cluster.manager.name
            config = stack_config(base / "stack.toml", args.image, [f"node.hostname=={manager}"])
            stack = Stack(cluster, "tbbench", config, replicas=1)
            stack.deploy()
            out["cluster_ready_s"] = round(time.monotonic() - began, 1)
            try:
                say("swarm backend, session on the gateway's node")
                out["systems"]["swarm_same_node"] = await measure(stack.web_url, user, args.runs, args.echo_samples)
                say(json.dumps(out["systems"]["swarm_same_node"]))
                stack_config(config, args.image, [f"node.hostname!={manager}"])
                stack.config_version += 1
                stack.deploy()
                say("swarm backend, session on another node")
                out["systems"]["swarm_other_node"] = await measure(stack.web_url, user, args.runs, args.echo_samples)
                say(json.dumps(out["systems"]["swarm_other_node"]))
                stack_config(config, args.image, [], per_user=args.sessions)
                stack.config_version += 1
                stack.deploy()
                say(f"swarm backend, {args.sessions} sessions over {len(cluster.nodes)} nodes")
                out["spread"] = await spread(stack, user, args.sessions)
            finally:
                stack.remove()
        finally:
            cluster.close()
    out["machine_after"] = machine()
    return out


def table(out: dict[str, Any]) -> str:
    rows = ["| system | login→prompt median (ms) | p90 | echo median (ms) | p99 |", "|---|---|---|---|---|"]
    for name, r in out["systems"].items():
        lp, echo = r["login_to_prompt"], r["echo"]
        rows.append(f"| {name} | {lp.get('median_ms')} | {lp.get('p90_ms')} | {echo.get('median_ms')} | {echo.get('p99_ms')} |")
    spread_ = out.get("spread")
    if spread_:
        rows.append("")
        rows.append(f"{spread_['sessions']} sessions: {spread_['per_node']}; an idle session holds "
                    f"{spread_['idle_session_mib']} MiB on its node")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(run(args))
    out["command"] = "python -m benchmarks.swarm " + " ".join(sys.argv[1:] if argv is None else argv)
    history.append(out, "swarm")
    print(json.dumps(out, indent=2))
    print(table(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
