"""Fakes at the session core's two seams, for fast unit tests without Docker or SSH: a backend
that keeps its containers in a dict (the `bridge.backends.base.Backend` contract), an upstream whose
shell is a pair of queues, and a front door that records what it was told.

Every feature these stand in for also has a test through the real thing (tests/test_web_session.py,
tests/test_sessions.py, tests/test_pool.py ...). Containers get a loopback address whose port
answers with an SSH banner, so the warm pool's readiness probe runs unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from bridge.backends.base import Container, ContainerInfo, ContainerSpec, ContainerState, ContainerStats
from bridge.errors import SessionStartError


class FakeBackend:
    """Containers in a dict. `gate`, when set, holds every start until it is set (a slow
    engine); `fail_start` makes starts fail the way the contract says (nothing left behind)."""

    def __init__(self, banner_port: int) -> None:
        self.banner_port = banner_port
        self.live: dict[str, ContainerSpec] = {}  # container id -> what it was started for
        self.stopped: list[str] = []  # every stop call, in order (stop is idempotent)
        self.started = 0
        self.gate: asyncio.Event | None = None
        self.fail_start: Exception | None = None
        self.states: dict[str, ContainerState] = {}  # what poll() says, once set by a test
        self.lost: set[str] = set()  # what unreachable() says: containers whose host went away
        self.unreachable_error: Exception | None = None  # raised by unreachable() (no quorum)
        self._ids = itertools.count(1)

    async def ping(self) -> str:
        return "fake"

    async def prepare(self) -> None:
        return None

    async def start(self, spec: ContainerSpec) -> Container:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_start is not None:
            raise self.fail_start
        cid = f"c{next(self._ids):04d}"
        self.live[cid] = spec
        self.started += 1
        return Container(cid, f"termbridge-{spec.user or 'pool'}-{spec.session_id[:8]}", "127.0.0.1",
                         self.banner_port, spec.user or "pool")

    async def claim(self, container: Container, user: str, uid: int, root: bool) -> Container:
        if container.id not in self.live:
            raise SessionStartError(detail=f"claim: {container.id} is gone")
        return Container(container.id, container.name.replace("-pool-", f"-{user}-"), container.address,
                         container.port, "root" if root else user)

    async def stop(self, container_id: str) -> None:
        self.stopped.append(container_id)
        self.live.pop(container_id, None)

    async def poll(self, container_id: str) -> ContainerState:
        if container_id in self.states:
            return self.states[container_id]
        return ContainerState(running=True) if container_id in self.live else ContainerState(running=False, gone=True)

    async def stats(self, container_id: str) -> ContainerStats | None:
        """A container that never uses anything (the real figures: tests/test_console.py)."""
        return ContainerStats(0.0, 0, 0, time.monotonic()) if container_id in self.live else None

    async def list_own(self) -> list[ContainerInfo]:
        return [ContainerInfo(cid, cid, spec.session_id, spec.user) for cid, spec in self.live.items()]

    async def unreachable(self) -> set[str]:
        if self.unreachable_error is not None:
            raise self.unreachable_error
        return self.lost & set(self.live)

    async def close(self) -> None:
        return None


class FakeShell:
    """A login shell (as the holder serves it: `offset` and `lost` are its numbering): what the
    person types is recorded; output and the exit come from the test."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.lost = 0
        self.typed = bytearray()
        self.sizes: list[tuple[int, int]] = []
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._exit: asyncio.Future[tuple[int | None, str | None]] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> bool:
        self.typed.extend(data)
        return False

    async def drain(self) -> None:
        return None

    async def read(self, limit: int) -> bytes:
        return await self._output.get()

    def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))

    async def wait_exit(self) -> tuple[int | None, str | None]:
        return await asyncio.shield(self._exit)

    def print(self, data: bytes) -> None:
        self._output.put_nowait(data)

    def exit(self, status: int | None, signal: str | None = None) -> None:
        """The shell ends (status None and no signal: the connection was lost)."""
        if not self._exit.done():
            self._output.put_nowait(b"")
            self._exit.set_result((status, signal))


class FakeUpstream:
    def __init__(self, container: Container) -> None:
        self.container = container
        self.shell: FakeShell | None = None
        self.closed = False

    async def attach_held(
        self, term: str, cols: int, rows: int, offset: int = 0, env: Any = None, repaint: bool = False
    ) -> FakeShell:
        self.shell = FakeShell(offset)
        return self.shell

    def close(self) -> None:
        self.closed = True
        if self.shell is not None:
            self.shell.exit(None)

    async def wait_closed(self) -> None:
        return None


class FakeConnect:
    """Stands in for `Upstream.connect`: `gate` holds connects, `fail` makes them fail."""

    def __init__(self) -> None:
        self.upstreams: list[FakeUpstream] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self, container: Container, keys: Any, timeout: float) -> FakeUpstream:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.upstreams.append(FakeUpstream(container))
        return self.upstreams[-1]


@dataclass
class RecordingSink:
    """A front door: every event it is told, in order."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    output_bytes: bytearray = field(default_factory=bytearray)
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def started(self, session: Any) -> None:
        self.events.append(("started", session.id))

    async def attached(self, offset: int, lost: int) -> None:
        self.events.append(("attached", (offset, lost)))

    async def output(self, data: bytes) -> None:
        self.output_bytes.extend(data)

    async def superseded(self) -> None:
        self.events.append(("superseded", None))

    async def viewers(self, viewers: list[Any]) -> None:
        self.events.append(("viewers", [v.describe() for v in viewers]))

    async def idle_warning(self, seconds: float) -> None:
        self.events.append(("idle-warning", round(seconds, 1)))

    async def ended(self, code: int | None, reason: Any, message: str | None) -> None:
        self.events.append(("ended", (code, str(reason), message)))
        self.ended_event.set()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


async def banner_server() -> asyncio.Server:
    """A loopback port that greets like sshd: the pool's readiness probe needs only the banner."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-fake\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(greet, "127.0.0.1", 0)
