"""Hostile workloads in one session: a fork bomb, a memory hog, an endless `yes`. A bystander
session's echo must stay responsive and the gateway must keep serving; the hostile session goes
on (or ends) with a clear reason. The bystander's echo latency is measured in each phase and
written to test-artifacts/hostile-echo.json (recorded, not asserted: speed belongs to benchmarks)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp
import aiohttp.client_exceptions

from helpers import PROMPT, ROOT, containers_gone

ARTIFACT = ROOT / "test-artifacts" / "hostile-echo.json"
SAMPLES = 12
LIVENESS = 20.0  # an echo slower than this is not "responsive" by any standard


async def echo_latencies(term) -> list[float]:
    """Type one character at a time at the bystander's prompt; time each until it is echoed."""
    latencies = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        await term.send("%")
        await term.expect(b"%", timeout=LIVENESS)
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.15)
    await term.send("\x15")  # erase the line again
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": round(ms[-1], 1), "samples": len(ms)}


class Drain:
    """Reads everything a session prints, as fast as it comes (the worst case for the gateway)."""

    def __init__(self, term) -> None:
        self.term = term
        self.bytes = 0
        self.tail = b""
        self.controls: list[dict] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self.term.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.bytes += len(msg.data)
                self.tail = (self.tail + msg.data)[-4096:]
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self.controls.append(json.loads(msg.data))

    async def interrupt(self, marker: str) -> None:
        """Ctrl-C until the shell's prompt is back (one may land between two OOM kills, where
        nobody receives it), then prove the shell answers."""
        for _ in range(40):
            await self.term.send("\x03")
            await asyncio.sleep(0.5)
            if self.tail.endswith(b"$ "):
                break
        await self.term.send(f"echo {marker}-$((40+2))\r")
        await self.wait_for(f"{marker}-42".encode())

    async def wait_for(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.tail:
            assert time.monotonic() < deadline, f"no {text!r} in {self.tail[-300:]!r}"
            assert not self.task.done(), f"socket closed: {self.controls}"
            await asyncio.sleep(0.05)


async def gateway_healthy(gateway) -> bool:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/healthz") as resp:
        return resp.status == 200


async def test_hostile_workloads_leave_others_responsive(gateway, make_user):
    bystander_user, hostile_user = make_user(), make_user()
    results: dict[str, dict] = {}
    async with await gateway.login(bystander_user) as calm_http, await gateway.login(hostile_user) as bad_http:
        calm = await gateway.terminal(calm_http)
        await calm.expect(PROMPT)
        bad = await gateway.terminal(bad_http)
        bad_session = await bad.control("session")
        await bad.expect(PROMPT)
        await bad.send("stty -echo\r")
        drain = Drain(bad)

        results["idle"] = summary(await echo_latencies(calm))

        # 1. an endless `yes`, read as fast as the gateway can relay it
        await bad.send("yes\r")
        await drain.wait_for(b"y\r\ny\r\n")
        before = drain.bytes
        results["yes"] = summary(await echo_latencies(calm))
        results["yes"]["relayed_mb"] = round((drain.bytes - before) / 1e6, 1)
        assert await gateway_healthy(gateway)
        await drain.interrupt("yes-stopped")

        # 2. a memory hog, again and again: the container's OOM killer takes it each time
        await bad.send("while :; do tail /dev/zero; done\r")
        await drain.wait_for(b"Killed")
        results["memory hog"] = summary(await echo_latencies(calm))
        assert await gateway_healthy(gateway)
        await drain.interrupt("hog-stopped")

        # 3. a fork bomb: the pids limit stops it; the shell itself survives
        await bad.send(":(){ :|:& };:\r")
        await drain.wait_for(b"Resource temporarily unavailable")
        results["fork bomb"] = summary(await echo_latencies(calm))
        assert await gateway_healthy(gateway)
        # the person can clean up with a builtin (no fork needed); their sshd session process runs
        # as them too, so this ends the session, with a reason
        await bad.send("kill -9 -1\r")
        await asyncio.wait_for(drain.task, 60)
        [exit_msg] = [m for m in drain.controls if m["type"] == "exit"]
        assert exit_msg["reason"] in ("exit", "error") and (exit_msg.get("message") or exit_msg["code"] is not None)
        results["fork bomb"]["hostile_session_end"] = exit_msg

        # the bystander never noticed
        assert (await calm.run("echo still-$((6*7))")).strip() == "still-42"
        await calm.send("exit\r")
        await calm.control("exit")
    await containers_gone(**{"termbridge.session": bad_session["id"]})

    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(results, indent=2) + "\n")
    print("\nbystander echo latency:", json.dumps(results, indent=2))
