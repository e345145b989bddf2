"""The pool's claim path, step by step: what a login that takes a pooled container waits for.

    .venv/bin/python -m benchmarks.claim [--runs 10] [--image termbridge/session:latest]

Pooled containers are made ahead (as the pool makes them, not timed), then each is claimed the
way a login claims one, and each step is timed in ms: `claim` (the backend makes the account),
`connect` (SSH into the container as the account, pinned keys), `attach` (the holder's exec
channel, which starts the shell) and `prompt` (until the shell's prompt arrives). Straight at the
backend and upstream, no gateway: the gateway's own part (PAM, the page, the WebSocket) is in the
main table's connect→prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pwd
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bridge.backends.base import ContainerSpec
from bridge.backends.docker import DockerBackend
from bridge.config import load_config
from bridge.pool import wait_for_sshd
from bridge.upstream import SessionKeys, Upstream
from testbed.accounts import create_user, delete_user
from testbed.gateway import PROMPT, TEST_IMAGE, write_config

from benchmarks.harness import remove_labelled, run_label, summary, workdir

STEPS = ("claim", "connect", "attach", "prompt", "total")
CGROUP_CPU = (  # where a container's CPU time is counted: cgroup v1 (cgroupfs), v2 (cgroupfs, systemd)
    ("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage", 1e-6),
    ("/sys/fs/cgroup/docker/{id}/cpu.stat", 1e-3),
    ("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat", 1e-3),
)


def container_cpu_ms(container_id: str) -> float | None:
    """CPU time the container has used so far (its processes, in its cgroup), or None when its
    cgroup is not where Docker usually puts it."""
    for pattern, to_ms in CGROUP_CPU:
        path = Path(pattern.format(id=container_id))
        if path.exists():
            text = path.read_text()
            value = int(text.split()[1] if text.startswith("usage_usec") else text.split()[0])
            return value * to_ms
    return None


async def pooled(backend: DockerBackend, timeout: float) -> tuple[Any, SessionKeys]:
    """A container made as the pool makes one: no user yet, sshd answering."""
    keys = SessionKeys.generate()
    spec = ContainerSpec(
        session_id=secrets.token_hex(16), user="", door="pool",
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        authorized_keys=keys.authorized_keys, host_private_key=keys.host_private_key,
        host_public_key=keys.host_public_key, root=False,
    )
    container = await backend.start(spec)
    await wait_for_sshd(container, timeout)
    return container, keys


async def claim_once(backend: DockerBackend, container: Any, keys: SessionKeys, user: str, uid: int) -> dict[str, float]:
    """One claim, as SessionManager does it after taking a pooled container; ms per step."""
    marks, cpu = [time.perf_counter()], [container_cpu_ms(container.id)]

    def mark() -> None:
        marks.append(time.perf_counter())
        cpu.append(container_cpu_ms(container.id))

    claimed = await backend.claim(container, user, uid, False)
    mark()
    upstream = await Upstream.connect(claimed, keys, 30)
    mark()
    try:
        shell = await upstream.attach_held("xterm-256color", 80, 24)
        mark()
        seen = b""
        async with asyncio.timeout(30):
            while not PROMPT.search(seen):
                seen += await shell.read(65536)
        mark()
    finally:
        upstream.close()
    took = [round((b - a) * 1000, 2) for a, b in zip(marks, marks[1:])]
    sample = dict(zip(STEPS, [*took, round((marks[-1] - marks[0]) * 1000, 2)]))
    if None not in cpu:  # the container's own CPU in each step (its share of the wall time)
        used = [round(b - a, 2) for a, b in zip(cpu, cpu[1:])]  # type: ignore[operator]
        sample |= {f"{step}_cpu": ms for step, ms in zip(STEPS, [*used, round(sum(used), 2)])}
    return sample


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = workdir()
    run_id = run_label()
    user = create_user()
    try:
        cfg = load_config(write_config(base / "gateway.toml", base / "state", "login", session={"image": args.image, "cpus": args.cpus}),
                          env={}).session
        backend = DockerBackend(cfg, f"bench-claim-{run_id}")
        samples: list[dict[str, float]] = []
        try:
            await backend.prepare()
            for _ in range(args.runs):
                container, keys = await pooled(backend, cfg.start_timeout)
                await asyncio.sleep(args.settle)  # a pooled container waits a while before a login comes
                try:
                    samples.append(await claim_once(backend, container, keys, user.name, pwd.getpwnam(user.name).pw_uid))
                finally:
                    await backend.stop(container.id)
        finally:
            await backend.close()
            remove_labelled(**{"termbridge.gateway": f"bench-claim-{run_id}"})
    finally:
        delete_user(user)
    cpu = {step: summary([s[f"{step}_cpu"] / 1000 for s in samples if f"{step}_cpu" in s]) for step in STEPS}
    return {
        "image": args.image, "runs": args.runs,
        "steps_ms": {step: summary([s[step] / 1000 for s in samples]) for step in STEPS},
        "container_cpu_ms": cpu, "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.claim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="claims to time (default 10)")
    parser.add_argument("--image", default=TEST_IMAGE, help="session image (default $TB_TEST_IMAGE or :latest)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds a pooled container waits before its claim")
    parser.add_argument("--cpus", type=float, default=0.5, help="session.cpus of the containers (default 0.5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    for step in STEPS:
        s, c = results["steps_ms"][step], results["container_cpu_ms"][step]
        print(f"{step:8} median {s.get('median_ms')} ms  p90 {s.get('p90_ms')} ms  max {s.get('max_ms')} ms"
              f"  (container CPU median {c.get('median_ms', '?')} ms)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
