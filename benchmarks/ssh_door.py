"""Measure the SSH door from outside with the real OpenSSH client.

    SSHPASS=secret python benchmarks/ssh_door.py --port 2222 --user alice [--runs 10]

Connect-to-prompt: from starting `ssh -tt` until the shell's prompt arrives (TCP, key exchange,
PAM, container start, upstream SSH, shell). Throughput: `ssh host 'head -c 100M /dev/zero' >
/dev/null`, whole command, and net of the time `ssh host true` takes. Medians are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = re.compile(rb"[$#] $")
MIB = 1024 * 1024


def ssh_argv(args: argparse.Namespace, known_hosts: str, *rest: str) -> list[str]:
    return [
        "sshpass", "-e", "ssh", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR", "-p", str(args.port),
        f"{args.user}@{args.host}", *rest,
    ]


def connect_to_prompt(args: argparse.Namespace, known_hosts: str) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(ssh_argv(args, known_hosts, "-tt"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    seen = b""
    deadline = start + 60
    while not PROMPT.search(seen):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.perf_counter()))
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            proc.kill()
            raise SystemExit(f"no prompt; got {seen[-200:]!r}")
        seen += chunk
    elapsed = time.perf_counter() - start
    proc.stdin.write(b"exit\n")
    proc.stdin.close()
    proc.wait(30)
    return elapsed


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2222)
    parser.add_argument("--user", required=True)
    parser.add_argument("--runs", type=int, default=10, help="connect-to-prompt samples")
    parser.add_argument("--bulk-runs", type=int, default=3, help="throughput samples")
    parser.add_argument("--mib", type=int, default=100, help="MiB streamed by head -c")
    args = parser.parse_args()
    if "SSHPASS" not in os.environ:
        print("set SSHPASS to the user's password", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        known_hosts = os.path.join(tmp, "known_hosts")
        prompts = [connect_to_prompt(args, known_hosts) for _ in range(args.runs)]
        print(
            f"connect-to-prompt: median {statistics.median(prompts) * 1000:.0f} ms "
            f"(min {min(prompts) * 1000:.0f}, max {max(prompts) * 1000:.0f}, n={len(prompts)})"
        )
        overhead = statistics.median(timed(ssh_argv(args, known_hosts, "true")) for _ in range(args.bulk_runs))
        bulk = statistics.median(
            timed(ssh_argv(args, known_hosts, f"head -c {args.mib}M /dev/zero")) for _ in range(args.bulk_runs)
        )
        print(f"ssh host true: median {overhead * 1000:.0f} ms")
        print(
            f"ssh host 'head -c {args.mib}M /dev/zero' > /dev/null: median {bulk:.2f} s, "
            f"{args.mib / bulk:.0f} MiB/s whole command, {args.mib / max(bulk - overhead, 1e-6):.0f} MiB/s net of connect"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
