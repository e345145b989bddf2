"""The scale run: N live web sessions on one gateway, `streaming` of them printing output the
whole time, while the others are probed for keystroke echo. Reports the idle sessions' echo
p50/p99, the gateway's RSS and CPU, and the host's memory per session.

The streaming sessions live in a child process, so that draining their output does not delay
the probes' event loop (the gateway, not the measuring client, is under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

from .clients import Reader, WebTerm, echo_round_trips
from .systems import Opened, System
from .harness import PROMPT, GatewayProcess, HostUser, containers, cpu_times, login, meminfo, summary

from bridge.backends.base import LABEL_GATEWAY

TICK = 0.1  # a rate-limited stream prints one burst per tick


def stream_command(rate_kb: float) -> bytes:
    """Output forever: full speed (`base64 /dev/urandom`) when rate is 0, else `rate_kb` kB/s
    of base64 in bursts, like a busy build log. The paced loop forks nothing per burst (`read -t`
    on an empty pipe is its sleep), so what loads the machine is the output, not process churn."""
    if rate_kb <= 0:
        return b"base64 /dev/urandom\r"
    raw = max(1, int(rate_kb * 1000 * TICK * 3 / 4))
    return (f"c=$(head -c {raw} /dev/urandom | base64 -w0); exec 3<> <(:); "
            f"while :; do echo \"$c\"; read -t {TICK} -u 3; done\r").encode()


async def open_prompted(http, url: str) -> tuple[WebTerm, Reader]:
    term = await WebTerm.connect(http, url)
    reader = Reader(term)
    await reader.until(PROMPT, timeout=120)
    return term, reader


async def _stream_sessions(url: str, user: HostUser, count: int, rate_kb: float, ready, stop, results) -> None:
    http = await login(url, user)
    try:
        opened = [await open_prompted(http, url) for _ in range(count)]
        received = [0] * count

        async def drain(i: int, term: WebTerm) -> None:
            while chunk := await term.recv():
                received[i] += len(chunk)

        for term, _ in opened:
            await term.send(stream_command(rate_kb))
        drains = [asyncio.create_task(drain(i, term)) for i, (term, _) in enumerate(opened)]
        ready.set()
        t0 = time.monotonic()
        start = sum(received)
        await asyncio.to_thread(stop.wait)
        elapsed, streamed = time.monotonic() - t0, sum(received) - start
        for term, _ in opened:
            await term.send(b"\x03")
            await term.send(b"exit\r")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*drains, return_exceptions=True)
        results.put({"bytes": streamed, "seconds": round(elapsed, 2), "mb_per_s": round(streamed / elapsed / 1e6, 2)})
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise
    finally:
        await http.close()


def stream_worker(url: str, name: str, password: str, count: int, rate_kb: float, ready, stop, results) -> None:
    """Child process entry point (plain arguments: they cross a spawn)."""
    asyncio.run(_stream_sessions(url, HostUser(name, password), count, rate_kb, ready, stop, results))


class Jitter:
    """How late a 1 ms sleep wakes up in a thread of this process, while the probes run: the
    host's own scheduling delay, to read the probes' tail against."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jitter", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.001)
            self.late.append(time.perf_counter() - t0 - 0.001)

    def __enter__(self) -> Jitter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def container_memory(container_id: str) -> int | None:
    """Bytes charged to one container's memory cgroup (cgroup v1 or v2), if readable."""
    for path in (
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}/memory.usage_in_bytes"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.current"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/memory.current"),
    ):
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
    return None


async def run_scale(
    gateway: GatewayProcess, user: HostUser, sessions: int, streaming: int, rate_kb: float,
    probes: int, settle: float = 5.0, gap: float = 0.02, concurrency: int = 8, say=print,
    floor: System | None = None, floor_sessions: int = 5,
) -> dict[str, Any]:
    """With `floor`, a few sessions straight into containers (no gateway) are probed in turn with
    the gateway's: the same machine at the same moment, to tell the gateway's share of the tail
    from the host's."""
    idle_count = sessions - streaming
    assert idle_count >= 1, "at least one idle session is needed to probe"
    mem_before = meminfo("MemAvailable")
    rss_before = gateway.rss_kib()
    http = await login(gateway.url, user)
    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    child = None
    idle: list[tuple[WebTerm, Reader]] = []
    controls: list[Opened] = []
    out: dict[str, Any] = {"sessions": sessions, "streaming": streaming,
                           "stream": "full speed" if rate_kb <= 0 else f"{rate_kb:g} kB/s each"}
    try:
        say(f"scale: opening {idle_count} idle sessions ({concurrency} at a time)")
        gate = asyncio.Semaphore(concurrency)

        async def one() -> tuple[WebTerm, Reader]:
            async with gate:
                return await open_prompted(http, gateway.url)

        t0 = time.monotonic()
        for result in await asyncio.gather(*(one() for _ in range(idle_count)), return_exceptions=True):
            if isinstance(result, BaseException):
                raise RuntimeError(f"a session of the scale run failed to start: {result!r}")
            idle.append(result)
        if streaming:
            say(f"scale: opening {streaming} streaming sessions")
            child = ctx.Process(
                target=stream_worker, args=(gateway.url, user.name, user.password, streaming, rate_kb, ready, stop, results), daemon=True
            )
            child.start()
            if not await asyncio.to_thread(ready.wait, 300):
                raise RuntimeError("the streaming sessions did not start")
        out["all_started_s"] = round(time.monotonic() - t0, 1)
        await asyncio.sleep(settle)
        live = await asyncio.to_thread(containers, **{LABEL_GATEWAY: gateway.instance_id})
        mem_live = meminfo("MemAvailable")
        rss_live = gateway.rss_kib()
        charged = [m for m in (container_memory(c["Id"]) for c in live) if m is not None]
        if floor is not None and floor_sessions:
            say(f"scale: opening {floor_sessions} control sessions straight into containers (the floor)")
            controls = [await floor.open() for _ in range(floor_sessions)]

        say(f"scale: {probes} echo probes over {idle_count} idle sessions while {streaming} stream")
        cpu0, wall0, host0 = gateway.cpu_seconds(), time.monotonic(), cpu_times()
        samples: list[float] = []
        floor_samples: list[float] = []
        with Jitter() as jitter:
            for i in range(probes):  # paced, so the window spans seconds of streaming
                term, reader = idle[i % idle_count]
                samples += await echo_round_trips(term, reader, 1)
                if controls:
                    control = controls[i % len(controls)]
                    floor_samples += await echo_round_trips(control.term, control.reader, 1)
                await asyncio.sleep(gap)
        cpu1, wall1, host1 = gateway.cpu_seconds(), time.monotonic(), cpu_times()
        rss_peak = gateway.rss_kib()
        if child is not None:
            stop.set()
            out["streamed"] = await asyncio.to_thread(results.get, True, 60)
        out.update(
            idle_echo=summary(samples),
            host_jitter=summary(jitter.late),
            **({"floor_idle_echo": summary(floor_samples)} if floor_samples else {}),
            containers_live=len(live),
            gateway_cpu_percent=round((cpu1 - cpu0) / (wall1 - wall0) * 100, 1),
            host_cpu_busy_percent=round((host1[0] - host0[0]) / max(1, host1[1] - host0[1]) * 100, 1),
            gateway_rss_mb={"before": round(rss_before / 1024, 1), "live": round(rss_live / 1024, 1),
                            "after_probes": round(rss_peak / 1024, 1)},
            gateway_rss_per_session_kb=round((rss_live - rss_before) / sessions),
            host_mem_per_session_mb=round((mem_before - mem_live) / 1024 / sessions, 2),
            container_cgroup_mem_per_session_mb=round(sum(charged) / len(charged) / 2**20, 2) if charged else None,
        )
    finally:
        stop.set()
        say("scale: ending the sessions")
        for control in controls:
            with contextlib.suppress(Exception):
                await floor.close(control)  # type: ignore[union-attr]
        t_end = time.monotonic()
        for term, _ in idle:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await term.send(b"exit\r")
        for term, reader in idle:
            with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                await reader.until_closed(timeout=60)
        if child is not None:
            await asyncio.to_thread(child.join, 60)
            if child.is_alive():
                child.kill()
        await http.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and await asyncio.to_thread(containers, **{LABEL_GATEWAY: gateway.instance_id}):
            await asyncio.sleep(0.5)
        out["all_gone_s"] = round(time.monotonic() - t_end, 1)
    return out
