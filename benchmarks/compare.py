"""The systems measured side by side, interleaved: every round gives each system one turn, so a
burst of load on the shared machine falls on all of them alike rather than on whichever
happened to run then.

Per system: `runs` connect→prompt / close→gone pairs; `echo_samples` keystroke echoes in
blocks on one session; `rounds` throughput runs of `megabytes` each (the median is reported).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .clients import echo_round_trips, throughput
from .harness import summary
from .systems import Opened, System

ECHO_BLOCKS = 10


@dataclass
class Samples:
    connect: list[float] = field(default_factory=list)
    close_gone: list[float] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)
    throughput: list[dict[str, float]] = field(default_factory=list)

    def result(self, title: str) -> dict[str, Any]:
        rates = sorted(self.throughput, key=lambda r: r["mb_per_s"])
        middle = rates[len(rates) // 2] if rates else {}
        return {
            "title": title,
            "connect": summary(self.connect),
            "echo": summary(self.echo),
            "throughput": {**middle, "runs_mb_per_s": [r["mb_per_s"] for r in self.throughput],
                           "median_of": len(rates)} if rates else {},
            "close_gone": summary(self.close_gone),
        }


class Comparison:
    def __init__(self, systems: list[System], say: Callable[[str], None]) -> None:
        self.systems = list(systems)
        self.live = list(systems)
        self.samples = {s.key: Samples() for s in systems}
        self.failed: dict[str, dict[str, Any]] = {}
        self.opened: dict[str, Opened] = {}
        self.say = say

    async def _each(self, step: Callable[[System], Awaitable[None]]) -> None:
        """Every live system takes its turn; a failure takes it out of later rounds and keeps
        the others' numbers."""
        for system in list(self.live):
            try:
                await step(system)
            except Exception as exc:
                self.say(f"{system.title}: FAILED: {exc!r}")
                self.failed[system.key] = {"title": system.title, "error": repr(exc)}
                self.live.remove(system)

    async def _session(self, system: System, record: bool) -> None:
        opened = await system.open()
        gone = await system.close(opened)
        if record:
            self.samples[system.key].connect.append(opened.connect_seconds)
            self.samples[system.key].close_gone.append(gone)

    async def _open(self, system: System) -> None:
        self.opened[system.key] = await system.open()

    async def _echo(self, system: System, count: int) -> None:
        opened = self.opened[system.key]
        self.samples[system.key].echo += await echo_round_trips(opened.term, opened.reader, count)

    async def _throughput(self, system: System, megabytes: float) -> None:
        opened = self.opened[system.key]
        self.samples[system.key].throughput.append(await throughput(opened.term, opened.reader, megabytes))

    async def _close(self, system: System) -> None:
        await system.close(self.opened.pop(system.key))

    async def run(self, runs: int, echo_samples: int, megabytes: float, rounds: int, warm_up: bool) -> dict[str, Any]:
        names = ", ".join(s.title for s in self.live)
        try:
            await self._each(lambda s: s.setup())
            if warm_up:  # one untimed session each: caches, the network, the image's pages
                self.say(f"warm-up: one untimed session each of {names}")
                await self._each(lambda s: self._session(s, record=False))
            self.say(f"connect→prompt and close→gone: {runs} rounds")
            for _ in range(runs):
                await self._each(lambda s: self._session(s, record=True))
            await self._each(self._open)
            self.say(f"keystroke echo: {echo_samples} each, in {ECHO_BLOCKS} interleaved blocks")
            for block in range(ECHO_BLOCKS):
                count = echo_samples // ECHO_BLOCKS + (1 if block < echo_samples % ECHO_BLOCKS else 0)
                if count:
                    await self._each(lambda s: self._echo(s, count))
            self.say(f"throughput: {rounds} × {megabytes:g} MB each")
            for _ in range(rounds):
                await self._each(lambda s: self._throughput(s, megabytes))
            await self._each(self._close)
        finally:
            for system in self.systems:
                try:
                    await system.teardown()
                except Exception as exc:
                    self.say(f"{system.title}: teardown failed: {exc!r}")
        out = dict(self.failed)
        for system in self.live:
            out[system.key] = self.samples[system.key].result(system.title)
        return out
