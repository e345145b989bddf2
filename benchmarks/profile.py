"""Where the gateway's time goes: py-spy samples the gateway process during one measurement, and
the samples are folded into the functions that hold the most time.

py-spy comes from PyPI (`pip install -e '.[bench]'`); without it `--profile` says so and the
benchmark runs unprofiled.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RATE = 250  # samples per second: enough for a few seconds of work, light on a 2-core machine
# Frames every sample shares (the interpreter and the event loop's own loop) say nothing.
_PLUMBING = re.compile(r"^(<module>|_run_module_as_main|_run_code|main|serve|run_app|BaseEventLoop\.\w+|Handle\._run) ")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def record(pid: int, out: Path) -> Iterator[None]:
    """Sample `pid` while the block runs; collapsed stacks land in `out`."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    proc = subprocess.Popen(
        [spy, "record", "-p", str(pid), "-r", str(RATE), "-f", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.3)  # attached before the work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def _frame(raw: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)`, the line dropped so a function adds up."""
    match = re.match(r"^(.*) \((?:.*/)?([^/]+?)(?::\d+)?\)$", raw)
    return f"{match.group(1)} ({match.group(2)})" if match else raw


def hot_spots(path: Path, top: int = 12) -> dict[str, Any]:
    """Share of samples per function: `self` where the sample was taken (a syscall's time shows
    on the Python line that made it), `total` for the function and what it called."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for name in set(frames):
            if not _PLUMBING.match(name) and not name.startswith(("process ", "thread ")):
                total[name] += n
    share = lambda c: [[round(100 * v / samples, 1), k] for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": samples, "self_percent": share(own) if samples else [], "total_percent": share(total) if samples else []}
