"""Admins watching or joined: a viewer of a session follows its output (the whole buffer first)
without holding its owner back; a joined admin's keystrokes reach the shell recorded as theirs;
the owner is told who is there, and the audit trail and recording say so.

The same calls serve a view on this gateway (web/watch.py) and one relayed from another gateway
(relay.py): the session is always served here.
"""

from __future__ import annotations

from typing import cast

from .errors import SessionStartError
from .observers import Observers
from .session import Session, TerminalSink, Viewer
from .stream import Watcher, WatchSink
from .vocab import WatchMode


class Viewing:
    def __init__(self, observers: Observers) -> None:
        self.observers = observers

    async def add(self, session: Session, admin: str, mode: WatchMode, sink: WatchSink) -> tuple[Viewer, Watcher]:
        """`admin` watches (or joins) `session`: its whole buffer is replayed to `sink` (a
        full-screen program asked to repaint if the buffer no longer starts at the beginning),
        then it follows live. The owner is told, the audit trail and the recording say so."""
        stream = session.stream
        if stream is None or not session.ready:
            raise SessionStartError("this session has no terminal to watch", detail="watch: no stream")
        viewer = Viewer(admin, WatchMode(mode))
        session.viewers.append(viewer)
        watcher = stream.watch(sink)
        if stream.output.start > 0:
            self.repaint(session)
        session.log.info("%s %s", admin, "joined" if mode == WatchMode.JOIN else "watches")
        session.mark(f"{admin} {'joined (may type)' if mode == WatchMode.JOIN else 'started watching'}")
        self.observers.viewer_started(session, viewer)
        await self.tell_owner(session)
        return viewer, watcher

    async def remove(self, session: Session, viewer: Viewer, watcher: Watcher) -> None:
        """The admin's view closed (or the session ended under it). Idempotent."""
        if viewer not in session.viewers:
            return
        session.viewers.remove(viewer)
        if session.stream is not None:
            session.stream.unwatch(watcher)
        session.log.info("%s stopped %s", viewer.admin, "the join" if viewer.mode == WatchMode.JOIN else "watching")
        if not session.ending:
            session.mark(f"{viewer.admin} {'left' if viewer.mode == WatchMode.JOIN else 'stopped watching'}")
        self.observers.viewer_ended(session, viewer)
        await self.tell_owner(session)

    @staticmethod
    async def type_as(session: Session, data: bytes, admin: str) -> None:
        """A joined admin's keystrokes to the shell, recorded as theirs; an ending session drops them."""
        try:
            if session.feed(data, by=admin):
                await session.drain()
        except ConnectionError:
            if not session.ending:
                raise

    @staticmethod
    async def tell_owner(session: Session) -> None:
        """The owner's window hears who is watching or joined (also after it attached anew)."""
        sink = session.sink
        if sink is None or session.ending:
            return
        try:
            await cast(TerminalSink, sink).viewers(list(session.viewers))
        except (ConnectionError, RuntimeError) as exc:
            session.log.info("could not tell the owner who watches: %r", exc)

    @staticmethod
    def repaint(session: Session) -> None:
        """Ask a full-screen program to draw its screen again (a size change and back), for a
        view whose replay does not start at the session's beginning."""
        if session.stream is None or session.term_size is None or not session.ready:
            return
        cols, rows = session.term_size
        session.stream.shell.resize(cols - 1 if cols > 1 else cols + 1, rows)
        session.stream.shell.resize(cols, rows)
