"""The session manager against fakes at its seams (tests/fakes.py): limits, timers, end reasons,
and the container's removal on every path. Fast (no Docker, no SSH); the same behaviour is also
tested through the real gateway in test_sessions.py, test_web_session.py and test_pool.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.auth import AuthenticatedUser
from bridge.backends.base import ContainerState
from bridge.config import load_config
from bridge.errors import BackendUnavailable, LimitReached, SessionStartError
from bridge.fleet import HOST_LOST
from bridge.session import Session, TerminalRequest
from bridge.sessions import SessionManager
from bridge.vocab import Door, WatchMode
from fakes import FakeBackend, FakeConnect, FakeShell, RecordingSink, banner_server
from helpers import wait_for, write_config

ALICE = AuthenticatedUser("alice", 1000, 1000)
BOB = AuthenticatedUser("bob", 1001, 1001)


@dataclass
class Core:
    manager: SessionManager
    backend: FakeBackend
    connect: FakeConnect

    async def open(self, user: AuthenticatedUser = ALICE) -> tuple[Session, RecordingSink, FakeShell]:
        sink = RecordingSink()
        session = await self.manager.open_terminal(user, Door.WEB, sink, TerminalRequest())
        shell = self.connect.upstreams[-1].shell
        assert shell is not None
        return session, sink, shell

    async def removed(self, session: Session) -> None:
        """The session's container is gone: the backend was told to stop it."""
        assert session.container is not None
        cid = session.container.id
        await wait_for(lambda: cid in self.backend.stopped and cid not in self.backend.live, timeout=2,
                       interval=0.01, what=f"container {cid} to be removed")


@pytest.fixture
async def core_with(tmp_path: Path) -> AsyncIterator[Any]:
    """A session manager on a fake backend and a fake upstream, configured with `session` keys.
    Closing it (as the gateway does on shutdown) must leave no container behind."""
    server = await banner_server()
    made: list[Core] = []

    def make(**session: Any) -> Core:
        path = write_config(tmp_path / f"core{len(made)}.toml", tmp_path / "state", "unused", session=session)
        backend, connect = FakeBackend(server.sockets[0].getsockname()[1]), FakeConnect()
        made.append(Core(SessionManager(load_config(path, env={}), backend, connect=connect), backend, connect))
        return made[-1]

    yield make
    for core in made:
        if core.backend.gate is not None:
            core.backend.gate.set()
        core.connect.gate = None
        await core.manager.close()
        assert not core.backend.live, f"containers left behind: {core.backend.live}"
    server.close()
    await server.wait_closed()


async def test_exit_ends_with_its_status_and_removes_the_container(core_with):
    core = core_with()
    session, sink, shell = await core.open()
    assert sink.kinds() == ["started", "attached"]
    await session.write(b"echo hi\r")
    shell.print(b"hi\r\n")
    await wait_for(lambda: bytes(sink.output_bytes) == b"hi\r\n", timeout=2, interval=0.01)
    assert bytes(shell.typed) == b"echo hi\r"
    shell.exit(3)
    await sink.ended_event.wait()
    assert sink.events[-1] == ("ended", (3, "exit", None))
    await core.removed(session)
    assert not core.manager.sessions and session.end_reason == "exit"


async def test_a_shell_killed_by_a_signal_ends_as_exit_with_the_signal_named(core_with):
    core = core_with()
    session, sink, shell = await core.open()
    shell.exit(None, "KILL")
    await sink.ended_event.wait()
    assert sink.events[-1] == ("ended", (None, "exit", "the shell was killed by signal KILL"))
    await core.removed(session)


@pytest.mark.parametrize(
    "state, message",
    [
        (ContainerState(running=False, oom_killed=True), "your container ran out of memory (200 MiB) and was stopped"),
        (ContainerState(running=False, exit_code=137), "your container stopped (exit code 137)"),
        (ContainerState(running=False, gone=True), "your container was removed"),
    ],
    ids=["oom", "stopped", "removed"],
)
async def test_a_lost_connection_ends_with_what_the_backend_says(core_with, state, message):
    core = core_with()
    session, sink, shell = await core.open()
    assert session.container is not None
    core.backend.states[session.container.id] = state
    shell.exit(None)  # the channel closed without a status: the container went away underneath
    await sink.ended_event.wait()
    assert sink.events[-1] == ("ended", (None, "error", message))
    await core.removed(session)


async def test_a_session_whose_host_went_away_ends_with_error_and_its_container_goes(core_with):
    core = core_with()
    session, sink, _ = await core.open()
    other, other_sink, _ = await core.open(BOB)
    assert session.container is not None
    core.backend.lost.add(session.container.id)
    assert await core.manager.keeper.end_lost_hosts() == 1
    assert sink.events[-1] == ("ended", (None, "error", HOST_LOST))
    await core.removed(session)
    assert other_sink.kinds() == ["started", "attached"] and not other.ending


@pytest.mark.parametrize("error", [
    BackendUnavailable(detail="the swarm does not have a leader"),
    RuntimeError("an answer nobody expected"),
], ids=["unavailable", "unexpected"])
async def test_a_backend_that_cannot_answer_leaves_running_sessions_alone(core_with, error):
    """Neither stops the host watch: the next round asks again."""
    core = core_with()
    session, sink, _ = await core.open()
    core.backend.unreachable_error = error
    watch = asyncio.create_task(core.manager.watch_hosts(interval=0.01))
    await asyncio.sleep(0.1)
    assert not watch.done() and not session.ending and sink.kinds() == ["started", "attached"]
    core.backend.unreachable_error = None
    assert session.container is not None
    core.backend.lost.add(session.container.id)
    await sink.ended_event.wait()
    assert sink.events[-1] == ("ended", (None, "error", HOST_LOST))
    watch.cancel()


async def test_a_failed_container_start_leaves_nothing(core_with):
    core = core_with()
    core.backend.fail_start = SessionStartError(detail="engine said no")
    with pytest.raises(SessionStartError):
        await core.open()
    assert not core.manager.sessions and not core.backend.live and not core.connect.upstreams


async def test_a_failed_ssh_connect_removes_the_started_container(core_with):
    core = core_with()
    core.connect.fail = SessionStartError(detail="sshd at 127.0.0.1 not reachable")
    with pytest.raises(SessionStartError):
        await core.open()
    assert core.backend.started == 1 and not core.manager.sessions
    await wait_for(lambda: core.backend.stopped and not core.backend.live, timeout=2, interval=0.01,
                   what="the started container to be removed")


@pytest.mark.parametrize("during", ["container start", "ssh connect"])
async def test_cancelling_a_start_removes_the_container(core_with, during):
    """A front door that goes away while its session starts (the person closed the page)."""
    core = core_with()
    gate = asyncio.Event()
    if during == "container start":
        core.backend.gate = gate  # the backend's thread is still creating it
    else:
        core.connect.gate = gate
    opening = asyncio.create_task(core.open())
    await asyncio.sleep(0.05)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert not core.manager.sessions
    gate.set()  # the container lands (or the connect would have gone on) after the cancel
    await wait_for(lambda: core.backend.started == 1 and not core.backend.live, timeout=2, interval=0.01,
                   what="the late container to be removed")


async def test_an_abandoned_start_holds_its_slot_until_its_container_is_gone(core_with):
    """Starts dropped at once must not pile up containers (or Docker calls) past max_per_user."""
    core = core_with(max_per_user=2, max_total=10)
    core.backend.gate = gate = asyncio.Event()  # Docker is still creating the containers
    for _ in range(2):
        opening = asyncio.create_task(core.open())
        await asyncio.sleep(0.02)
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
    assert not core.manager.sessions and core.manager.count_for(ALICE.name) == 2
    with pytest.raises(LimitReached, match="session.max_per_user"):
        await core.open()
    gate.set()  # the containers land and are removed: the slots are free again
    await wait_for(lambda: core.manager.count_for(ALICE.name) == 0, timeout=2, interval=0.01, what="the slots")
    assert core.backend.started == 2 and not core.backend.live
    await core.open()


async def test_kill_ends_with_reason_killed_and_removes_the_container(core_with):
    core = core_with()
    session, sink, _ = await core.open()
    await core.manager.kill(session)
    assert sink.events[-1] == ("ended", (None, "killed", "an administrator ended this session"))
    await core.removed(session)
    await core.manager.kill(session)  # idempotent
    assert sink.kinds().count("ended") == 1


async def test_shutdown_ends_every_session_and_a_start_in_flight(core_with):
    core = core_with()
    (_, first_sink, _), (_, second_sink, _) = await core.open(ALICE), await core.open(BOB)
    core.backend.gate = asyncio.Event()
    starting = asyncio.create_task(core.open(ALICE))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(core.manager.close())
    await asyncio.sleep(0.05)
    core.backend.gate.set()  # the start in flight lands during the shutdown
    await closing
    for sink in (first_sink, second_sink):
        assert sink.events[-1] == ("ended", (None, "killed", "the gateway is shutting down"))
    with pytest.raises(SessionStartError):
        await starting
    assert not core.backend.live and not core.manager.sessions
    with pytest.raises(LimitReached, match="shutting down"):
        await core.open(BOB)


async def test_per_user_and_total_limits(core_with):
    core = core_with(max_per_user=1, max_total=2)
    first, sink, shell = await core.open(ALICE)
    with pytest.raises(LimitReached, match="session.max_per_user"):
        await core.open(ALICE)
    await core.open(BOB)
    with pytest.raises(LimitReached, match="session.max_total"):
        await core.open(AuthenticatedUser("carol", 1002, 1002))
    assert core.backend.started == 2  # a refusal starts nothing
    shell.exit(0)
    await sink.ended_event.wait()
    await core.removed(first)
    await wait_for(lambda: core.manager.count_for(ALICE.name) == 0, timeout=2, interval=0.01, what="the slot")
    await core.open(ALICE)  # a slot is free again once the container is gone


async def test_pooled_containers_count_toward_the_total(core_with):
    core = core_with(pool=2, max_total=2, max_per_user=1)
    pool = core.manager.pool
    pool.kick()  # what the gateway does once it serves
    await wait_for(lambda: len(pool.ready) == 2, timeout=2, interval=0.01, what="the pool to fill")
    first, first_sink, first_shell = await core.open(ALICE)  # takes a pooled container
    assert first.container is not None and first.container.name.startswith("termbridge-alice-")
    await asyncio.sleep(0.2)  # the pool may not refill: 1 session + 1 pooled = max_total
    assert len(core.backend.live) == 2 and len(pool.ready) == 1
    await core.open(BOB)  # takes the other one
    with pytest.raises(LimitReached, match="session.max_total"):
        await core.open(AuthenticatedUser("carol", 1002, 1002))
    await asyncio.sleep(0.2)
    assert core.backend.started == 2 and not pool.ready
    first_shell.exit(0)
    await first_sink.ended_event.wait()
    await wait_for(lambda: len(pool.ready) == 1, timeout=2, interval=0.01, what="the pool to refill the freed slot")
    assert len(core.backend.live) == 2


async def test_idle_warns_then_ends_and_input_resets_the_clock(core_with):
    core = core_with(idle_timeout="400ms")
    session, sink, _ = await core.open()
    loop = asyncio.get_running_loop()
    typing_until = loop.time() + 0.6  # longer than the limit
    while True:
        await session.write(b" ")
        last_input = loop.time()
        if last_input > typing_until:
            break
        await asyncio.sleep(0.1)
    assert sink.kinds() == ["started", "attached"]
    await sink.ended_event.wait()
    assert 0.35 <= loop.time() - last_input <= 1.0
    assert sink.kinds() == ["started", "attached", "idle-warning", "ended"]
    assert sink.events[-1] == ("ended", (None, "idle", "the session was idle for too long"))
    await core.removed(session)


async def test_lifetime_ends_a_busy_session(core_with):
    core = core_with(max_lifetime="500ms")
    session, sink, _ = await core.open()
    loop = asyncio.get_running_loop()
    while not sink.ended_event.is_set() and loop.time() - session.ready_at < 2:
        await session.write(b" ")
        await asyncio.sleep(0.05)
    assert sink.events[-1] == ("ended", (None, "lifetime", "the session reached its maximum lifetime"))
    assert 0.45 <= loop.time() - session.ready_at <= 1.0
    await core.removed(session)


async def test_a_detached_session_ends_after_the_grace_and_is_removed(core_with):
    core = core_with(reconnect_grace="300ms")
    session, sink, _ = await core.open()
    core.manager.detach(session, sink)
    await asyncio.sleep(0.1)
    assert session.container is not None and session.container.id in core.backend.live  # still in its grace
    await wait_for(lambda: session.end_reason == "disconnected", timeout=2, interval=0.01)
    assert "ended" not in sink.kinds()  # nobody is there to tell
    await core.removed(session)


class SlowView:
    """An admin's view (a stream watcher) that takes nothing until released."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.gaps: list[int] = []
        self.release = asyncio.Event()

    async def output(self, data: bytes) -> None:
        await self.release.wait()
        self.data.extend(data)

    async def gap(self, lost: int) -> None:
        self.gaps.append(lost)


async def test_a_slow_watcher_never_holds_the_owner_back_and_skips_ahead(core_with):
    core = core_with()
    session, sink, shell = await core.open()
    shell.print(b"screen so far\r\n")
    await wait_for(lambda: b"screen so far" in sink.output_bytes, timeout=2, interval=0.01)
    view = SlowView()
    viewer, watcher = await core.manager.viewing.add(session, "bob", WatchMode.WATCH, view)
    chunk = b"x" * 65536
    for _ in range(40):  # 2.5 MiB: more than the buffer keeps
        shell.print(chunk)
    await wait_for(lambda: len(sink.output_bytes) >= 40 * 65536, timeout=5, interval=0.01, what="the owner's output")
    view.release.set()
    shell.print(b"THE-END")
    await wait_for(lambda: view.data.endswith(b"THE-END"), timeout=5, interval=0.01, what="the view to catch up")
    assert view.data.startswith(b"screen so far") and view.gaps and sum(view.gaps) + len(view.data) == session.stream.output.total
    await core.manager.viewing.remove(session, viewer, watcher)
    assert session.stream.watchers == [] and session.viewers == []


async def test_viewers_are_told_to_the_owner_and_a_joined_admins_input_is_theirs(core_with):
    core = core_with()
    session, sink, shell = await core.open()
    typed: list[tuple[bytes, str | None]] = []

    class Tap:
        def input(self, data: bytes, by: str | None = None) -> None:
            typed.append((data, by))

        def output(self, data: bytes) -> None: ...
        def resize(self, cols: int, rows: int) -> None: ...
        def mark(self, text: str) -> None: ...
        def close(self) -> None: ...

    session.taps.append(Tap())
    view = SlowView()
    view.release.set()
    viewer, watcher = await core.manager.viewing.add(session, "bob", WatchMode.JOIN, view)
    assert ("viewers", [{"user": "bob", "mode": "join"}]) in sink.events
    await session.write(b"mine\r")
    if session.feed(b"bobs\r", by="bob"):
        await session.drain()
    assert bytes(shell.typed) == b"mine\rbobs\r"
    assert typed == [(b"mine\r", None), (b"bobs\r", "bob")]
    await core.manager.viewing.remove(session, viewer, watcher)
    await core.manager.viewing.remove(session, viewer, watcher)  # idempotent
    assert [e for e in sink.events if e[0] == "viewers"][-1] == ("viewers", [])
    assert len([e for e in sink.events if e[0] == "viewers"]) == 2
