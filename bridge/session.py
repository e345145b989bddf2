"""One session: who, which door, its container, its upstream connection and (web) its stream, and
the accounting every door reports its bytes to. The manager (`sessions.py`) creates and ends it;
the doors talk to it through the `Sink` they gave the manager and the few methods here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .auth import AuthenticatedUser
from .backends.base import Container
from .config import DEFAULT_PROFILE, SessionConfig
from .stream import Stream, StreamSink
from .upstream import SessionKeys, Upstream
from .vocab import Door, EndReason, WatchMode

log = logging.getLogger("termbridge.sessions")


class Sink(Protocol):
    """Where one session's control events go: the front door attached to it."""

    async def started(self, session: Session) -> None:
        """The session is ready (or, for a terminal, resumed): the first call a sink gets."""

    async def idle_warning(self, seconds: float) -> None: ...

    async def ended(self, code: int | None, reason: EndReason, message: str | None) -> None: ...


class TerminalSink(Sink, StreamSink, Protocol):
    """A front door that shows a shell session's output stream (the web door): see
    `SessionManager.open_terminal` and `stream.Stream`."""

    async def restarting(self) -> None:
        """The gateway stops but the session runs on: come back (to it, or another gateway)."""

    async def viewers(self, viewers: list[Viewer]) -> None:
        """Who watches or joined the session now (the owner always knows); also on attach."""


@dataclass(eq=False)
class Viewer:
    """An admin watching (read-only) or joined (may type) a session they do not own."""

    admin: str
    mode: WatchMode
    since: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, str]:
        return {"user": self.admin, "mode": str(self.mode)}


class StreamTap(Protocol):
    """Sees one session's terminal stream as the doors report it (e.g. a recorder). Called on the
    loop for every chunk: must be cheap and must not raise."""

    def output(self, data: bytes) -> None: ...

    def input(self, data: bytes, by: str | None = None) -> None:
        """Keystrokes; `by` names a joined admin (None: the session's owner)."""

    def mark(self, text: str) -> None:
        """A note in the stream (someone started or stopped watching)."""

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


class SessionLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        # also as record attributes, which the JSON log carries as fields of their own
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return f"[session={self.extra['session']} user={self.extra['user']}] {msg}", kwargs


class Session:
    def __init__(
        self, user: AuthenticatedUser, door: Door, sink: Sink, session_id: str | None = None,
        max_lifetime: float = float("inf"), profile: str = DEFAULT_PROFILE, settings: SessionConfig | None = None,
    ) -> None:
        self.id = session_id or secrets.token_hex(16)
        self.user = user
        self.door = door
        self.profile = profile
        self.settings = settings  # the profile's session settings; None: the manager's [session]
        self.sink: Sink | None = sink
        self.started_at = datetime.now(timezone.utc)
        self.created = time.monotonic()
        # When the lifetime ends: counted from the start of the start, so that the gateway (which
        # says why) ends it before the holder in the container (the backstop) does.
        self.lifetime_end = self.created + max_lifetime
        self.container: Container | None = None
        self.upstream: Upstream | None = None
        self.keys: SessionKeys | None = None  # to reconnect to the container (kept in the store)
        self.released = False  # this gateway let go; the session runs on without it
        self.adopted = False  # started by another gateway process; this one reconnected to it
        self.stream: Stream | None = None  # a shell on a pty (web sessions)
        self.last_activity = time.monotonic()
        self.ready_at: float | None = None
        self.warned = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.term_size: tuple[int, int] | None = None
        self.taps: list[StreamTap] = []
        self.viewers: list[Viewer] = []  # admins watching or joined, in the order they came
        self.end_reason: EndReason | None = None
        self.exit_code: int | None = None
        self.exit_signal: str | None = None
        self.channels: list[dict[str, Any]] = []  # the SSH door's channels: kind, and how each ended
        self.log = SessionLog(log, {"session": self.id[:12], "user": user.name})
        self.removal_scheduled = False
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        """The shell runs and the session has not begun to end."""
        return self.stream is not None and not self.ending

    @property
    def connected(self) -> bool:
        """The container's sshd is connected (with or without a shell) and the session lives."""
        return self.upstream is not None and not self.ending

    @property
    def ending(self) -> bool:
        """Ending, or let go by this gateway: nothing here may act on it any more."""
        return self.end_reason is not None or self.released

    def touch(self) -> None:
        """Activity from the person: the idle clock starts over."""
        self.last_activity = time.monotonic()
        self.warned = False

    # Every door reports the bytes it moves through these three, whatever its plumbing: they are
    # the one place for activity, accounting, and whatever else watches a session's stream.

    def note_input(self, data: bytes, by: str | None = None) -> None:
        """Bytes from the person (or from `by`, a joined admin) reached the container: activity."""
        self.touch()
        self.bytes_in += len(data)
        for tap in self.taps:
            tap.input(data, by)

    def mark(self, text: str) -> None:
        for tap in self.taps:
            tap.mark(text)

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

    def feed(self, data: bytes, by: str | None = None) -> bool:
        """Hand the person's keystrokes (`by`: a joined admin's) to the shell's channel. True when
        input is left unsent (the container is not reading): the caller then awaits `drain()`
        before taking more."""
        if not self.ready or not data:
            return False
        if self.stream is None:
            raise RuntimeError("a ready session without a stream")
        self.note_input(data, by)
        return self.stream.shell.write(data)

    async def drain(self) -> None:
        if self.stream is not None:
            await self.stream.shell.drain()

    async def write(self, data: bytes) -> None:
        """Send the person's keystrokes to the shell; waits while the container is not reading."""
        if self.feed(data):
            await self.drain()

    def resize(self, cols: int, rows: int) -> None:
        if not self.ready:
            return
        if self.stream is None:
            raise RuntimeError("a ready session without a stream")
        self.note_resize(cols, rows)
        self.stream.shell.resize(cols, rows)

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user": self.user.name,
            "door": self.door,
            "profile": self.profile,
            "container": self.container.name if self.container else None,
            "container_id": self.container.id if self.container else None,
            "started": self.started_at.isoformat(timespec="seconds"),
            "idle_for": round(time.monotonic() - self.last_activity, 1),
            "attached": self.stream is None or self.stream.attachment is not None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "viewers": [viewer.describe() for viewer in self.viewers],
        }
