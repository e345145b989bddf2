"""The session manager: limits, the registry, activity, idle and lifetime timers, and the reaper.

A session is one container, one upstream SSH connection and one pty process. Front doors hand
the manager an authenticated user and a `Sink` (where output and control events go); the
manager owns everything else, and every path that ends a session goes through `end()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import asyncssh

from .auth import AuthenticatedUser
from .backend import Backend, Container, ContainerSpec, ContainerState
from .config import Config
from .errors import BridgeError, LimitReached, SessionStartError
from .outbuf import OutputBuffer
from .pool import Pooled, WarmPool
from .upstream import SessionKeys, Upstream

log = logging.getLogger("termbridge.sessions")

READ_CHUNK = 65536
# Output flow control. Attached: the pump reads ahead of what the person's socket took by at most
# ATTACHED_WINDOW (keeps a runaway `yes` from queueing seconds of output ahead of Ctrl-C).
# Detached: it stops reading (the shell pauses when it next writes) while less than
# IN_FLIGHT_RESERVE bytes before the drop would still be replayable; what was in flight when the
# socket died (send buffers, bounded by SEND_BUFFER in the web door) can be replayed exactly.
ATTACHED_WINDOW = 256 * 1024
IN_FLIGHT_RESERVE = 1024 * 1024 - READ_CHUNK


class Sink(Protocol):
    """Where one session's control events go: the front door attached to it."""

    async def started(self, session: Session) -> None: ...

    async def idle_warning(self, seconds: float) -> None: ...

    async def ended(self, code: int | None, reason: str, message: str | None) -> None: ...


class AttachedSink(Sink, Protocol):
    """A front door that reads a shell session's output stream (the web door). It may drop and
    come back: see `SessionManager.attach`."""

    async def attached(self, session: Session, offset: int, lost: int) -> None:
        """Called before any output: the stream starts at `offset`; `lost` bytes were too old."""

    async def output(self, data: bytes) -> None: ...

    async def superseded(self) -> None:
        """Another attach took this session over; this sink gets nothing more."""


class SessionObserver:
    """Watches sessions and logins for the operations side (audit trail, metrics). Subclass and
    override what you need. Methods run on the event loop, so they must not block; one that
    raises is logged and skipped, never allowed to break a session."""

    def login(self, user: str, rhost: str | None, door: str, result: str, reason: str) -> None:
        """A login attempt at any door; `result` is one of LOGIN_RESULTS."""

    def session_started(self, session: Session, seconds: float) -> None:
        """The session is ready, `seconds` after create() began (the time to a prompt)."""

    def session_failed(self, session: Session, detail: str) -> None:
        """The session never became ready; `session.end_reason` is `error` or `cancelled`."""

    def session_ended(self, session: Session) -> None:
        """A session that was ready has ended; its container's removal is under way."""

    def session_refused(self, user: AuthenticatedUser, door: str, detail: str) -> None:
        """A limit (or shutdown) refused a new session before anything was started."""

    def session_killed(self, session: Session, actor: str) -> None:
        """Someone ended a session from outside: `admin`, `logout`, `shutdown`."""

    def containers_reaped(self, count: int) -> None:
        """The reaper removed `count` containers that no live session owned."""


LOGIN_RESULTS = ("ok", "denied", "unavailable", "throttled")


class StreamTap(Protocol):
    """Sees one session's terminal stream as the doors report it (e.g. a recorder). Called on the
    loop for every chunk: must be cheap and must not raise."""

    def output(self, data: bytes) -> None: ...

    def input(self, data: bytes) -> None: ...

    def resize(self, cols: int, rows: int) -> None: ...

    def close(self) -> None: ...


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


def _describe_end(state: ContainerState, memory: int) -> str | None:
    """Why a container stopped, in words for the person; None while it runs."""
    if state.gone:
        return "your container was removed"
    if state.oom_killed:
        return f"your container ran out of memory ({memory // 2**20} MiB) and was stopped"
    if not state.running:
        return f"your container stopped (exit code {state.exit_code})"
    return None


class SessionLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        return f"[session={self.extra['session']} user={self.extra['user']}] {msg}", kwargs


class Session:
    def __init__(self, user: AuthenticatedUser, door: str, sink: Sink, session_id: str | None = None) -> None:
        self.id = session_id or secrets.token_hex(16)
        self.user = user
        self.door = door
        self.sink: Sink | None = sink
        self.started_at = datetime.now(timezone.utc)
        self.created = time.monotonic()
        self.container: Container | None = None
        self.upstream: Upstream | None = None
        self.process: asyncssh.SSHClientProcess | None = None
        self.last_activity = time.monotonic()
        self.ready_at: float | None = None
        self.warned = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.term_size: tuple[int, int] | None = None
        self.taps: list[StreamTap] = []
        self.end_reason: str | None = None
        self.exit_code: int | None = None
        self.log = SessionLog(log, {"session": self.id[:12], "user": user.name})
        self.output = OutputBuffer()
        self.attachment: Attachment | None = None
        self.detached_cursor = 0  # what the last attachment had taken when it went
        self.attached_once = False
        self.removal_scheduled = False
        self._output_event = asyncio.Event()  # more output, or the session ends
        self._space_event = asyncio.Event()  # a reader advanced, or attachments changed
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._grace: asyncio.Task | None = None

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
        for tap in self.taps:
            tap.input(data)

    def note_output(self, data: bytes) -> None:
        """Bytes from the container are on their way to the person (output is not activity)."""
        self.bytes_out += len(data)
        for tap in self.taps:
            tap.output(data)

    def note_resize(self, cols: int, rows: int) -> None:
        """The person's terminal changed size: activity."""
        self.touch()
        self.term_size = (cols, rows)
        for tap in self.taps:
            tap.resize(cols, rows)

    def feed(self, data: bytes) -> bool:
        """Hand the person's keystrokes to the shell's channel. True when input is left unsent
        (the container is not reading): the caller then awaits `drain()` before taking more."""
        if not self.ready or not data:
            return False
        if self.process is None:
            raise RuntimeError("a ready session without a process")
        self.note_input(data)
        self.process.stdin.write(data)
        return self.process.stdin.channel.get_write_buffer_size() > 0

    async def drain(self) -> None:
        if self.process is not None:
            await self.process.stdin.drain()

    async def write(self, data: bytes) -> None:
        """Send the person's keystrokes to the shell; waits while the container is not reading."""
        if self.feed(data):
            await self.drain()

    def resize(self, cols: int, rows: int) -> None:
        if not self.ready:
            return
        if self.process is None:
            raise RuntimeError("a ready session without a process")
        self.note_resize(cols, rows)
        self.process.change_terminal_size(cols, rows)

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def _pump_may_read(self) -> bool:
        total = self.output.total
        if self.attachment is not None:
            return total - self.attachment.cursor < ATTACHED_WINDOW
        keep_from = max(0, self.detached_cursor - IN_FLIGHT_RESERVE)
        return total + READ_CHUNK - keep_from <= self.output.capacity

    def _append_output(self, data: bytes) -> None:
        self.output.append(data)
        self.note_output(data)
        self._output_event.set()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user": self.user.name,
            "door": self.door,
            "container": self.container.name if self.container else None,
            "started": self.started_at.isoformat(timespec="seconds"),
            "idle_for": round(time.monotonic() - self.last_activity, 1),
            "attached": self.attachment is not None or self.process is None,
        }


class Attachment:
    """One front door reading a session's output from `cursor` on, in its own sender task."""

    def __init__(self, session: Session, sink: AttachedSink, cursor: int) -> None:
        self.session = session
        self.sink = sink
        self.cursor = cursor
        self.task: asyncio.Task | None = None

    async def send(self) -> None:
        session, output = self.session, self.session.output
        while True:
            if self.cursor < output.total:
                data = output.read(self.cursor, READ_CHUNK)
                await self.sink.output(data)
                self.cursor += len(data)
                session._space_event.set()
            else:
                session._output_event.clear()
                await session._output_event.wait()

    async def flush(self, timeout: float) -> None:
        """Wait until the sink took everything the pump read (the shell's last words)."""
        try:
            async with asyncio.timeout(timeout):
                while self.task is not None and not self.task.done() and self.cursor < self.session.output.total:
                    self.session._space_event.clear()
                    await self.session._space_event.wait()
        except TimeoutError:
            self.session.log.info("output not flushed to the front door within %.0f s", timeout)


class SessionManager:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.sessions: dict[str, Session] = {}
        self._cleanups: set[asyncio.Task] = set()
        self._starting: set[asyncio.Future] = set()  # backend starts in flight (threads)
        self._closing = False
        self.observers: list[SessionObserver] = []
        self.pool = WarmPool(config.session.pool, backend, config.session, self._room) if config.session.pool else None

    def _room(self) -> int:
        """How many more containers this gateway may hold (sessions and pooled ones alike)."""
        return self.config.session.max_total - len(self.sessions) - (self.pool.held if self.pool else 0)

    def start_pool(self) -> None:
        if self.pool is not None:
            self.pool.kick()

    def _notify(self, event: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("observer %s failed on %s", type(observer).__name__, event)

    def note_login(self, user: str, rhost: str | None, door: str, result: str, reason: str = "") -> None:
        """Every door reports each login attempt here (never the password), whatever its outcome,
        so that the audit trail and the metrics see all doors alike."""
        if result not in LOGIN_RESULTS:
            raise ValueError(f"login result {result!r} is not one of {LOGIN_RESULTS}")
        self._notify("login", user, rhost, door, result, reason)

    # -- limits -------------------------------------------------------------------------------

    def count_for(self, username: str) -> int:
        return sum(1 for s in self.sessions.values() if s.user.name == username)

    def _check_limits(self, user: AuthenticatedUser) -> None:
        cfg = self.config.session
        if self._closing:
            raise LimitReached("the gateway is shutting down", detail="refused: shutting down")
        # A login that takes a pooled container adds nothing to what the gateway holds.
        takes_pooled = self.pool is not None and bool(self.pool.ready)
        if self._room() + takes_pooled <= 0:
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
        try:
            self._check_limits(user)
        except LimitReached as exc:
            self._notify("session_refused", user, door, exc.detail)
            raise
        pooled = self.pool.take() if self.pool is not None else None
        session = Session(user, door, sink, pooled.session_id if pooled else None)
        self.sessions[session.id] = session
        session.log.info("starting (%s door%s)", door, f", pooled {pooled.container.name}" if pooled else "")
        try:
            await self._provision(session, terminal, pooled)
        except asyncio.CancelledError:
            self._finish(session, "cancelled")
            raise
        except BridgeError as exc:
            session.log.error("start failed: %s", exc.detail)
            self._finish(session, "error", exc.detail)
            raise
        except Exception as exc:
            session.log.exception("start failed")
            self._finish(session, "error", repr(exc))
            raise SessionStartError(detail=repr(exc)) from exc
        if session.ready_at is None:
            raise RuntimeError("a started session without ready_at")
        session.log.info(
            "ready in %.0f ms: container %s",
            (session.ready_at - session.created) * 1000,
            session.container and session.container.name,
        )
        return session

    async def _provision(self, session: Session, terminal: TerminalRequest | None, pooled: Pooled | None) -> None:
        cfg = self.config.session
        if pooled is not None:
            keys = pooled.keys
            session.container = pooled.container  # removed with the session, whatever happens next
            session.container = await self.backend.claim(pooled.container, session.user.name, cfg.user == "root")
        else:
            keys = SessionKeys.generate()
            session.container = await self._start_container(session, keys)
        self._check_not_ended(session)
        async with asyncio.timeout(cfg.start_timeout):
            session.upstream = await Upstream.connect(session.container, keys, cfg.start_timeout)
            if terminal is not None:
                session.process = await session.upstream.open_terminal(
                    terminal.term, terminal.cols, terminal.rows, terminal.env
                )
                session.term_size = (terminal.cols, terminal.rows)
        self._check_not_ended(session)
        session.ready_at = time.monotonic()
        session.touch()
        self._notify("session_started", session, session.ready_at - session.created)
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

    async def _start_container(self, session: Session, keys: SessionKeys) -> Container:
        spec = ContainerSpec(
            session_id=session.id,
            user=session.user.name,
            door=session.door,
            started=session.started_at.isoformat(timespec="seconds"),
            authorized_keys=keys.authorized_keys,
            host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key,
            root=self.config.session.user == "root",
        )
        start = asyncio.ensure_future(self.backend.start(spec))
        self._starting.add(start)
        start.add_done_callback(self._starting.discard)
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            # The thread may still create the container: remove it when it lands, in a task that
            # close() waits for (a callback would fire after shutdown and leak it).
            self._track(self._remove_when_started(start))
            raise

    async def _remove_when_started(self, start: asyncio.Future[Container]) -> None:
        try:
            container = await start
        except Exception:
            return  # the backend leaves nothing behind when a start fails
        await self._remove(container.id, "cancelled start")

    # -- attaching front doors to a shell's output ---------------------------------------------

    async def attach(self, session: Session, sink: AttachedSink, offset: int = 0) -> Attachment:
        """Attach `sink` to a shell session's output from byte `offset` on. A sink already
        attached is superseded. Bytes older than the buffer are reported as lost."""
        if session.process is None or session.ending:
            raise SessionStartError("this session cannot be attached", detail="attach to a session without a shell")
        offset = max(0, min(offset, session.output.total))
        start = max(offset, session.output.start)
        old = session.attachment
        if old is not None:
            self._stop_attachment(old)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await old.sink.superseded()
            session.log.info("attachment superseded by a new one")
        if session._grace is not None:
            session._grace.cancel()
            session._grace = None
        attachment = Attachment(session, sink, start)
        session.attachment, session.sink = attachment, sink
        session.attached_once = True
        await sink.attached(session, start, start - offset)
        attachment.task = asyncio.create_task(self._run_attachment(attachment), name=f"send-{session.id[:8]}")
        session._space_event.set()
        return attachment

    async def _run_attachment(self, attachment: Attachment) -> None:
        try:
            await attachment.send()
        except (ConnectionError, RuntimeError) as exc:
            attachment.session.log.info("front door went away while sending: %r", exc)
            self.detach(attachment.session, attachment.sink)

    def _stop_attachment(self, attachment: Attachment) -> None:
        if attachment.task is not None and attachment.task is not asyncio.current_task():
            attachment.task.cancel()

    def detach(self, session: Session, sink: AttachedSink) -> None:
        """`sink`'s front door went away: keep the session for `session.reconnect_grace`.
        A no-op when another sink has taken over, or the grace already runs."""
        if session.ending or session.process is None:
            return
        attachment = session.attachment
        if attachment is not None:
            if attachment.sink is not sink:
                return
            self._stop_attachment(attachment)
            session.attachment, session.sink = None, None
            session.detached_cursor = attachment.cursor
            session._space_event.set()
        elif session._grace is not None:
            return
        # A page that never received its session message has nothing to come back to.
        grace = self.config.session.reconnect_grace if session.attached_once else 0.0
        session.log.info("detached; %.0f s to reattach", grace)
        session._grace = asyncio.create_task(self._grace_expiry(session, grace))

    async def _grace_expiry(self, session: Session, grace: float) -> None:
        await asyncio.sleep(grace)
        if session.attachment is None and not session.ending:
            await self.end(session, "disconnected")

    async def _pump(self, session: Session) -> None:
        """Container output into the session's buffer, with flow control: when the reader falls
        behind (see `_pump_may_read`) we stop reading, and SSH windowing stops the container."""
        if session.process is None:
            raise RuntimeError("a started session without a process")
        stdout = session.process.stdout
        try:
            while True:
                while not session._pump_may_read():
                    session._space_event.clear()
                    await session._space_event.wait()
                data = await stdout.read(READ_CHUNK)
                if not data:
                    break
                session._append_output(data)
            await session.process.wait_closed()
            status = session.process.exit_status
            if status is not None and status >= 0:
                await self.end(session, "exit", code=status)
                return
            signal = session.process.exit_signal
            if signal:
                await self.end(session, "exit", code=None, message=f"the shell was killed by signal {signal[0]}")
                return
            await self._end_lost(session, "the shell ended without an exit status")
        except asyncio.CancelledError:
            raise
        except (asyncssh.Error, OSError) as exc:
            await self._end_lost(session, repr(exc))

    async def _end_lost(self, session: Session, detail: str) -> None:
        """The upstream went away without an exit status: ask Docker what happened."""
        message = "the connection to your container was lost"
        if session.container is not None:
            # The connection often drops a moment before Docker records the container's end.
            for _ in range(10):
                try:
                    state = await self.backend.poll(session.container.id)
                except BridgeError as exc:
                    detail += f"; Docker: {exc.detail}"
                    break
                described = _describe_end(state, self.config.session.memory)
                if described:
                    message = described
                    break
                await asyncio.sleep(0.2)
        session.log.warning("upstream lost: %s (%s)", detail, message)
        await self.end(session, "error", message=message)

    async def _watchdog(self, session: Session) -> None:
        cfg = self.config.session
        if session.ready_at is None:
            raise RuntimeError("a started session without ready_at")
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
        if session._grace is not None and session._grace is not current:
            session._grace.cancel()
        for task in session._tasks:
            if task is not current:
                task.cancel()
        attachment = session.attachment
        if attachment is not None:
            await attachment.flush(timeout=2)
            self._stop_attachment(attachment)
            session.attachment = None
        sink, session.sink = session.sink, None
        if sink is not None and reason != "disconnected":
            try:
                async with asyncio.timeout(5):
                    await sink.ended(code, reason, message)
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                session.log.info("could not tell the front door about the end: %r", exc)
        self._finish(session, reason)

    def _finish(self, session: Session, reason: str, detail: str = "") -> None:
        """Release everything the session holds; the container's removal runs in a task the
        manager owns, so a cancelled caller cannot skip it."""
        session.end_reason = session.end_reason or reason
        for tap in session.taps:
            tap.close()
        session.taps.clear()
        if session.upstream is not None:
            session.upstream.close()
        if session.container is not None and not session.removal_scheduled:
            session.removal_scheduled = True
            self._schedule_removal(session.container.id, f"session {session.id[:12]}")
        self.sessions.pop(session.id, None)
        if session._ended.is_set():
            return  # killed while starting, finished again once its container landed
        if self.pool is not None:
            self.pool.kick()  # a slot is free: the pool may refill up to max_total
        lived = time.monotonic() - session.ready_at if session.ready_at else 0.0
        session.log.info(
            "ended: reason=%s code=%s after %.1f s, %d bytes in, %d bytes out",
            session.end_reason,
            session.exit_code,
            lived,
            session.bytes_in,
            session.bytes_out,
        )
        if session.ready_at is None:
            self._notify("session_failed", session, detail or session.end_reason)
        else:
            self._notify("session_ended", session)
        session._ended.set()

    def _schedule_removal(self, container_id: str, why: str) -> None:
        self._track(self._remove(container_id, why))

    def _track(self, cleanup: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(cleanup)
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
        if self.pool is not None:
            live |= self.pool.ids()
        removed = 0
        for info in await self.backend.list_own():
            if info.id in live or info.session_id in live:
                continue
            log.info("reaping container %s (session %s, user %s)", info.name, info.session_id[:12], info.user)
            await self.backend.stop(info.id)
            removed += 1
        if removed:
            self._notify("containers_reaped", removed)
        return removed

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def list(self) -> list[Session]:
        return list(self.sessions.values())

    async def kill(
        self, session: Session, message: str = "an administrator ended this session", actor: str = "admin"
    ) -> None:
        """End a session from outside; `actor` (admin, logout, shutdown) goes to the audit trail."""
        if not session.ending:
            self._notify("session_killed", session, actor)
        await self.end(session, "killed", message=message)

    async def close(self, message: str = "the gateway is shutting down") -> None:
        """End every session (reason `killed`) and wait for every container's removal."""
        self._closing = True
        if self.pool is not None:
            await self.pool.close()
        await asyncio.gather(
            *(self.kill(s, message, actor="shutdown") for s in list(self.sessions.values())), return_exceptions=True
        )
        # Containers still being created land after this; their sessions then remove them.
        while self._starting or self._cleanups:
            await asyncio.gather(*list(self._starting), *list(self._cleanups), return_exceptions=True)
            await asyncio.sleep(0)
