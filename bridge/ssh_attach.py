"""`ssh -t alice@host attach [ID]`: the SSH door attaches to one of the person's own live
terminal sessions (started from the browser), so one session moves between the two doors.

The takeover rule of the web door holds across doors: the new attachment takes the session over
and the one attached so far is told (a page shows "opened in another window" and can take it
back; an attached ssh prints a line and exits). The attached client is the active one: the
shell's window size is its size. Closing the ssh connection detaches: the session waits its
reconnect grace for the page, as after a dropped socket. Without an ID: with one live session
it attaches at once, with several it asks which one.
"""

from __future__ import annotations

import asyncio

import asyncssh

from .auth import AuthenticatedUser
from .errors import BridgeError
from .session import Session, TerminalRequest, Viewer
from .sessions import SessionManager, started_and_idle
from .ssh_channels import refuse, say
from .store import SessionRecord
from .vocab import EndReason, WatchMode

READ_CHUNK = 4096
ID_MIN = 4  # the shortest id prefix `attach` takes
CHOICE_MAX = 8  # bytes of an answer to "which one?"


def parse_attach(command: str | bytes | None) -> list[str] | None:
    """The arguments of an `attach` command, or None when the command is something else."""
    if command is None:
        return None
    text = command.decode(errors="replace") if isinstance(command, bytes) else command
    words = text.split()
    return words[1:] if words and words[0] == "attach" else None


def _describe(entry: Session | SessionRecord) -> str:
    """One line of the list: id, door, when it started, how long it has been idle."""
    started, idle = started_and_idle(entry)
    return f"{entry.id}  {entry.door} door  started {started:%Y-%m-%d %H:%M} UTC  idle {int(idle // 60)} min"


class AttachSink:
    """An ssh channel as a terminal's attachment: `attach`'s, or the SSH door's own shell."""

    def __init__(self, process: asyncssh.SSHServerProcess) -> None:
        self.process = process
        self.session: Session | None = None
        self.done = False
        self._seen: dict[str, WatchMode] = {}

    async def started(self, session: Session) -> None:
        self.session = session

    async def attached(self, offset: int, lost: int) -> None:
        if lost:
            say(self.process, f"{lost} bytes of older output were not kept")

    async def output(self, data: bytes) -> None:
        self.process.stdout.write(data)
        await self.process.stdout.drain()

    async def idle_warning(self, seconds: float) -> None:
        say(self.process, f"this session ends in {round(seconds)} s unless you type something")

    def _leave(self, text: str, status: int) -> None:
        if not self.done:
            self.done = True
            refuse(self.process, text, status=status)

    async def superseded(self) -> None:
        self._leave("this session was opened in another window; it runs on there", 0)

    async def restarting(self) -> None:
        self._leave("the gateway is restarting; attach again in a moment", 255)

    async def ended(self, code: int | None, reason: EndReason, message: str | None) -> None:
        self._leave(message or f"the session ended ({reason})", code if code is not None and reason == EndReason.EXIT else 255)

    async def viewers(self, viewers: list[Viewer]) -> None:
        """A notice line (on the channel's stderr, never into the shell) for each admin who came
        or went since the last call."""
        now = {viewer.admin: viewer.mode for viewer in viewers}
        for admin, mode in now.items():
            if self._seen.get(admin) != mode:
                how = "joined this session and can type" if mode == WatchMode.JOIN else "is watching this session"
                say(self.process, f"administrator {admin} {how}")
        for admin in self._seen.keys() - now.keys():
            say(self.process, f"administrator {admin} stopped watching")
        self._seen = now


async def serve_attach(
    manager: SessionManager, user: AuthenticatedUser, process: asyncssh.SSHServerProcess, args: list[str]
) -> None:
    """Attach this channel to one of `user`'s live terminal sessions until either goes away."""
    if len(args) > 1:
        refuse(process, "usage: attach [SESSION-ID]", status=2)
        return
    if not process.term_type:
        refuse(process, "attach needs a terminal: use ssh -t", status=2)
        return
    live = await manager.own_terminals(user)
    if args:
        chosen = [s for s in live if len(args[0]) >= ID_MIN and s.id.startswith(args[0].lower())]
        if len(chosen) != 1:
            refuse(process, f"you have {'several' if chosen else 'no'} live sessions matching {args[0][:64]!r}")
            return
        target = chosen[0].id
    elif not live:
        refuse(process, "you have no live session to attach to")
        return
    elif len(live) == 1:
        target = live[0].id
    else:
        picked = await _ask(process, live)
        if picked is None:
            refuse(process, "nothing attached")
            return
        target = picked
    cols, rows = process.term_size[:2] if process.term_size else (80, 24)
    sink = AttachSink(process)
    try:
        session = await manager.attach_own(user, target, sink, TerminalRequest(process.term_type, cols or 80, rows or 24))
    except BridgeError as exc:
        refuse(process, exc.user_message)
        return
    session.log.info("attached from the SSH door")
    try:
        await pump_input(session, sink, process)
    finally:
        manager.detach(session, sink)
        if not sink.done and not session.ending:
            sink.done = True
            process.exit(0)


async def pump_input(session: Session, sink: AttachSink, process: asyncssh.SSHServerProcess) -> None:
    """Keystrokes and window changes to the session while this channel is its attachment."""
    stream = session.stream
    while not sink.done and not session.ending and stream is not None:
        try:
            data = await process.stdin.read(READ_CHUNK)
        except asyncssh.TerminalSizeChanged as change:
            if stream.attachment is not None and stream.attachment.sink is sink:
                session.resize(change.width, change.height)
            continue
        except (asyncssh.BreakReceived, asyncssh.SignalReceived):
            session.touch()
            continue
        except (asyncssh.Error, OSError):
            return
        if not data or stream.attachment is None or stream.attachment.sink is not sink:
            return
        if session.feed(data):
            await session.drain()


async def _ask(process: asyncssh.SSHServerProcess, live: list[Session | SessionRecord]) -> str | None:
    """With several sessions: list them and read a number (the client's terminal is raw: echo)."""
    lines = ["You have several live sessions:"] + [f"  {n}) {_describe(s)}" for n, s in enumerate(live, 1)]
    process.stdout.write(("\r\n".join(lines) + f"\r\nAttach to which (1-{len(live)}, Enter to cancel)? ").encode())
    answer = b""
    while len(answer) < CHOICE_MAX:
        try:
            data = await asyncio.wait_for(process.stdin.read(1), 120)
        except (asyncssh.TerminalSizeChanged, asyncssh.BreakReceived, asyncssh.SignalReceived):
            continue
        except (asyncssh.Error, OSError, TimeoutError):
            return None
        if data in (b"\r", b"\n", b""):
            break
        if data == b"\x7f":
            answer = answer[:-1]
            process.stdout.write(b"\b \b")
        elif data.isdigit():
            answer += data
            process.stdout.write(data)
        elif data == b"\x03":
            return None
    process.stdout.write(b"\r\n")
    choice = int(answer) if answer else 0
    return live[choice - 1].id if 1 <= choice <= len(live) else None
