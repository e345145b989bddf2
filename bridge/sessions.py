"""The session manager: limits, the registry, activity, idle and lifetime timers, and the reaper.

A session is one container, one upstream SSH connection and one pty process. Front doors hand
the manager an authenticated user and a `Sink` (where output and control events go); the
manager owns everything else, and every path that ends a session goes through `end()`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import asyncssh

from .auth import AuthenticatedUser
from .backend import Backend, Container, ContainerSpec
from .config import Config
from .errors import BridgeError, LimitReached, SessionStartError
from .upstream import SessionKeys, Upstream

log = logging.getLogger("termbridge.sessions")

READ_CHUNK = 65536


class Sink(Protocol):
    """Where one session's output and control events go: the front door attached to it."""

    async def started(self, session: Session) -> None: ...

    async def output(self, data: bytes) -> None: ...

    async def idle_warning(self, seconds: float) -> None: ...

    async def ended(self, code: int | None, reason: str, message: str | None) -> None: ...


@dataclass
class TerminalRequest:
    """The pty the person asked for. Mutable until the shell opens: a front door may update
    the size while the container starts, and the shell opens with the latest value."""

    term: str = "xterm-256color"
    cols: int = 80
    rows: int = 24
    env: dict[str, str] = field(default_factory=dict)


class IdleAction(enum.Enum):
    WAIT = "wait"
    WARN = "warn"
    END = "end"


def warn_before(idle_timeout: float) -> float:
    """How long before an idle end the person is warned: min(60 s, timeout / 3)."""
    return min(60.0, idle_timeout / 3)


def idle_step(last_activity: float, now: float, timeout: float, warned: bool) -> tuple[IdleAction, float]:
    """What the idle clock says at `now`, and how long until it next has something to say.

    A pure function of (last activity, now, limit, already warned), so it is testable alone.
    """
    remaining = last_activity + timeout - now
    if remaining <= 0:
        return IdleAction.END, 0.0
    lead = warn_before(timeout)
    if remaining <= lead:
        return (IdleAction.WAIT if warned else IdleAction.WARN), remaining
    return IdleAction.WAIT, remaining - lead


class SessionLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        return f"[session={self.extra['session']} user={self.extra['user']}] {msg}", kwargs


class Session:
    def __init__(self, user: AuthenticatedUser, door: str, sink: Sink) -> None:
        self.id = secrets.token_hex(16)
        self.user = user
        self.door = door
        self.sink: Sink | None = sink
        self.started_at = datetime.now(timezone.utc)
        self.container: Container | None = None
        self.upstream: Upstream | None = None
        self.process: asyncssh.SSHClientProcess | None = None
        self.last_activity = time.monotonic()
        self.ready_at: float | None = None
        self.warned = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.end_reason: str | None = None
        self.exit_code: int | None = None
        self.log = SessionLog(log, {"session": self.id[:12], "user": user.name})
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        """The shell runs and the session has not begun to end."""
        return self.process is not None and self.end_reason is None

    @property
    def connected(self) -> bool:
        """The container's sshd is connected (with or without a shell) and the session lives."""
        return self.upstream is not None and self.end_reason is None

    @property
    def ending(self) -> bool:
        return self.end_reason is not None

    def touch(self) -> None:
        """Activity from the person: the idle clock starts over."""
        self.last_activity = time.monotonic()
        self.warned = False

    # Every door reports the bytes it moves through these three, whatever its plumbing: they are
    # the one place for activity, accounting, and whatever else watches a session's stream.

    def note_input(self, data: bytes) -> None:
        """Bytes from the person reached the container: activity."""
        self.touch()
        self.bytes_in += len(data)

    def note_output(self, data: bytes) -> None:
        """Bytes from the container are on their way to the person (output is not activity)."""
        self.bytes_out += len(data)

    def note_resize(self, cols: int, rows: int) -> None:
        """The person's terminal changed size: activity."""
        self.touch()

    async def write(self, data: bytes) -> None:
        """Send the person's keystrokes to the shell; waits while the container is not reading."""
        if not self.ready or not data:
            return
        assert self.process is not None
        self.note_input(data)
        self.process.stdin.write(data)
        await self.process.stdin.drain()

    def resize(self, cols: int, rows: int) -> None:
        if not self.ready:
            return
        assert self.process is not None
        self.note_resize(cols, rows)
        self.process.change_terminal_size(cols, rows)

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user": self.user.name,
            "door": self.door,
            "container": self.container.name if self.container else None,
            "started": self.started_at.isoformat(timespec="seconds"),
            "idle_for": round(time.monotonic() - self.last_activity, 1),
        }


class SessionManager:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.sessions: dict[str, Session] = {}
        self._cleanups: set[asyncio.Task] = set()
        self._starting: set[asyncio.Future] = set()  # backend starts in flight (threads)
        self._closing = False

    # -- limits -------------------------------------------------------------------------------

    def count_for(self, username: str) -> int:
        return sum(1 for s in self.sessions.values() if s.user.name == username)

    def _check_limits(self, user: AuthenticatedUser) -> None:
        cfg = self.config.session
        if self._closing:
            raise LimitReached("the gateway is shutting down", detail="refused: shutting down")
        if len(self.sessions) >= cfg.max_total:
            raise LimitReached(
                f"this server is at its limit of {cfg.max_total} sessions (session.max_total); try again later",
                detail=f"refused: session.max_total={cfg.max_total} reached",
            )
        if self.count_for(user.name) >= cfg.max_per_user:
            raise LimitReached(
                f"you already have {cfg.max_per_user} sessions, the most allowed (session.max_per_user);"
                " end one first",
                detail=f"refused: session.max_per_user={cfg.max_per_user} reached",
            )

    # -- life cycle ---------------------------------------------------------------------------

    async def create(
        self, user: AuthenticatedUser, door: str, sink: Sink, terminal: TerminalRequest | None = None
    ) -> Session:
        """Start a session and attach `sink`. With `terminal`, a login shell on a pty is opened and
        its output pumped to the sink; without, the session is the container and its upstream
        connection only, and the door opens its own channels on `session.upstream`.

        Returns once ready and `sink.started` was called; raises a BridgeError (limit, Docker
        down, image missing, start failure) with nothing left behind. Cancelling the caller also
        leaves nothing behind."""
        self._check_limits(user)
        session = Session(user, door, sink)
        self.sessions[session.id] = session
        session.log.info("starting (%s door)", door)
        t0 = time.monotonic()
        try:
            await self._provision(session, terminal)
        except asyncio.CancelledError:
            self._finish(session, "cancelled")
            raise
        except BridgeError as exc:
            session.log.error("start failed: %s", exc.detail)
            self._finish(session, "error")
            raise
        except Exception as exc:
            session.log.exception("start failed")
            self._finish(session, "error")
            raise SessionStartError(detail=repr(exc)) from exc
        session.log.info(
            "ready in %.0f ms: container %s", (time.monotonic() - t0) * 1000, session.container and session.container.name
        )
        return session

    async def _provision(self, session: Session, terminal: TerminalRequest | None) -> None:
        cfg = self.config.session
        keys = SessionKeys.generate()
        spec = ContainerSpec(
            session_id=session.id,
            user=session.user.name,
            door=session.door,
            started=session.started_at.isoformat(timespec="seconds"),
            authorized_keys=keys.authorized_keys,
            host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key,
            root=cfg.user == "root",
        )
        start = asyncio.ensure_future(self.backend.start(spec))
        self._starting.add(start)
        start.add_done_callback(self._starting.discard)
        try:
            session.container = await asyncio.shield(start)
        except asyncio.CancelledError:
            # The thread may still create the container: remove it when it lands.
            start.add_done_callback(self._remove_when_started)
            raise
        self._check_not_ended(session)
        async with asyncio.timeout(cfg.start_timeout):
            session.upstream = await Upstream.connect(session.container, keys, cfg.start_timeout)
            if terminal is not None:
                session.process = await session.upstream.open_terminal(
                    terminal.term, terminal.cols, terminal.rows, terminal.env
                )
        self._check_not_ended(session)
        session.ready_at = time.monotonic()
        session.touch()
        if session.sink is not None:
            await session.sink.started(session)
        session._tasks.append(asyncio.create_task(self._watchdog(session), name=f"watchdog-{session.id[:8]}"))
        if session.process is not None:
            session._tasks.append(asyncio.create_task(self._pump(session), name=f"pump-{session.id[:8]}"))

    @staticmethod
    def _check_not_ended(session: Session) -> None:
        """A session killed while it started (logout, shutdown) must not go on to run."""
        if session.ending:
            raise SessionStartError(detail=f"ended ({session.end_reason}) while starting")

    def _remove_when_started(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            self._schedule_removal(task.result().id, "cancelled start")

    async def _pump(self, session: Session) -> None:
        """Container output to the attached sink. Awaiting the sink is the flow control: while the
        person's socket is full we stop reading, and SSH windowing stops the container."""
        assert session.process is not None
        stdout = session.process.stdout
        try:
            while True:
                data = await stdout.read(READ_CHUNK)
                if not data:
                    break
                session.note_output(data)
                sink = session.sink
                if sink is not None:
                    try:
                        await sink.output(data)
                    except (ConnectionError, RuntimeError) as exc:
                        session.log.info("front door went away while sending: %r", exc)
                        session.sink = None
            await session.process.wait_closed()
            status = session.process.exit_status
            if status is None or status < 0:
                signal = session.process.exit_signal
                message = f"the shell was killed by signal {signal[0]}" if signal else "the shell ended abnormally"
                await self.end(session, "exit", code=None, message=message)
            else:
                await self.end(session, "exit", code=status)
        except asyncio.CancelledError:
            raise
        except (asyncssh.Error, OSError) as exc:
            session.log.warning("connection to the container lost: %r", exc)
            await self.end(session, "error", message="the connection to your container was lost")

    async def _watchdog(self, session: Session) -> None:
        cfg = self.config.session
        assert session.ready_at is not None
        lifetime_end = session.ready_at + cfg.max_lifetime
        while not session.ending:
            now = time.monotonic()
            if now >= lifetime_end:
                await self.end(session, "lifetime", message="the session reached its maximum lifetime")
                return
            action, delay = idle_step(session.last_activity, now, cfg.idle_timeout, session.warned)
            if action is IdleAction.END:
                await self.end(session, "idle", message="the session was idle for too long")
                return
            if action is IdleAction.WARN:
                session.warned = True
                session.log.info("idle warning: %.0f s left", delay)
                if session.sink is not None:
                    try:
                        await session.sink.idle_warning(delay)
                    except (ConnectionError, RuntimeError):
                        pass
                continue
            await asyncio.sleep(max(0.05, min(delay, lifetime_end - now)))

    async def end(self, session: Session, reason: str, code: int | None = None, message: str | None = None) -> None:
        """End a session for `reason` (exit, idle, lifetime, killed, error, disconnected).
        Idempotent; tells the attached front door, then removes the container."""
        if session.ending:
            await session.wait_ended()
            return
        session.end_reason, session.exit_code = reason, code
        current = asyncio.current_task()
        for task in session._tasks:
            if task is not current:
                task.cancel()
        sink, session.sink = session.sink, None
        if sink is not None and reason != "disconnected":
            try:
                async with asyncio.timeout(5):
                    await sink.ended(code, reason, message)
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                session.log.info("could not tell the front door about the end: %r", exc)
        self._finish(session, reason)

    def _finish(self, session: Session, reason: str) -> None:
        """Release everything the session holds; the container's removal runs in a task the
        manager owns, so a cancelled caller cannot skip it."""
        session.end_reason = session.end_reason or reason
        if session.upstream is not None:
            session.upstream.close()
        if session.container is not None:
            self._schedule_removal(session.container.id, f"session {session.id[:12]}")
        self.sessions.pop(session.id, None)
        lived = time.monotonic() - session.ready_at if session.ready_at else 0.0
        session.log.info(
            "ended: reason=%s code=%s after %.1f s, %d bytes in, %d bytes out",
            session.end_reason,
            session.exit_code,
            lived,
            session.bytes_in,
            session.bytes_out,
        )
        session._ended.set()

    def _schedule_removal(self, container_id: str, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self._remove(container_id, why))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _remove(self, container_id: str, why: str) -> None:
        for attempt in range(3):
            try:
                await self.backend.stop(container_id)
                log.debug("removed container %s (%s)", container_id[:12], why)
                return
            except BridgeError as exc:
                log.warning("removing container %s failed (try %d): %s", container_id[:12], attempt + 1, exc.detail)
                await asyncio.sleep(1 + attempt)
        log.error("container %s not removed; the reaper will retry", container_id[:12])

    async def reap(self) -> int:
        """Remove containers of this gateway instance that no live session owns."""
        live = {s.container.id for s in self.sessions.values() if s.container} | set(self.sessions)
        removed = 0
        for info in await self.backend.list_own():
            if info.id in live or info.session_id in live:
                continue
            log.info("reaping container %s (session %s, user %s)", info.name, info.session_id[:12], info.user)
            await self.backend.stop(info.id)
            removed += 1
        return removed

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def list(self) -> list[Session]:
        return list(self.sessions.values())

    async def kill(self, session: Session, message: str = "an administrator ended this session") -> None:
        await self.end(session, "killed", message=message)

    async def close(self, message: str = "the gateway is shutting down") -> None:
        """End every session (reason `killed`) and wait for every container's removal."""
        self._closing = True
        await asyncio.gather(*(self.kill(s, message) for s in list(self.sessions.values())), return_exceptions=True)
        # Containers still being created land after this; their sessions then remove them.
        while self._starting or self._cleanups:
            await asyncio.gather(*list(self._starting), *list(self._cleanups), return_exceptions=True)
            await asyncio.sleep(0)
