"""Admins on one gateway watching or joining a session that another gateway sharing the store
serves, through the store's pub/sub (Redis; a SQLite store has one gateway, so nothing to relay).

Every gateway listens on one channel named after its instance id. The viewing gateway sends
`open`, then `input` (a join's keystrokes), `alive` every ALIVE_INTERVAL and `close`; the
serving gateway makes the admin a viewer of its session exactly as for a view opened there (so
the owner is told, and the audit trail and the recording are written where the session runs)
and answers `hello` (owner, size), then `out`, `gap`, `size`, `alive`, and `ended` or `error`.
Either side lets a view go after DEAD_AFTER seconds without a word from the other (a gateway
that died or lost the store). The admin check stays with the viewing gateway, which knows the
admin's login; the serving one lets only a `join` type.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections import deque
from typing import Any

from .errors import BridgeError, SessionStartError, StoreUnavailable
from .session import Session, Viewer
from .sessions import SessionManager
from .store import SessionRecord, Store, Subscription
from .stream import Watcher, WatchSink
from .vocab import EndReason, WatchMode

log = logging.getLogger("termbridge.relay")

ALIVE_INTERVAL = 2.0  # how often each side says it still holds a view
DEAD_AFTER = 10.0  # silence after which a view's other side is taken for gone
OPEN_TIMEOUT = 5.0  # how long the viewing gateway waits for the serving one's `hello`
FOLLOW_INTERVAL = 0.25  # how soon the serving side passes on a size change or the session's end
BACKLOG = 256  # messages a slow view may be behind before output is dropped (and told as a gap)


def _encode(**fields: Any) -> bytes:
    if "data" in fields:
        fields["data"] = base64.b64encode(fields["data"]).decode()
    return json.dumps(fields).encode()


def _decode(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    if not isinstance(message, dict) or not isinstance(message.get("view"), str):
        raise ValueError("not a relay message")
    if "data" in message:
        message["data"] = base64.b64decode(message["data"])
    return message


class Relay:
    """This gateway's end of the relay: the views here of sessions served elsewhere
    (`RemoteView`), and the views elsewhere of sessions served here (`_Served`)."""

    def __init__(self, manager: SessionManager, store: Store, instance: str) -> None:
        self.manager = manager
        self.store = store
        self.instance = instance
        self.views: dict[str, RemoteView] = {}
        self.served: dict[str, _Served] = {}
        self._subscription: Subscription | None = None
        self._listener: asyncio.Task | None = None

    async def start(self) -> None:
        self._subscription = await self.store.subscribe(self.instance)
        self._listener = asyncio.create_task(self._listen(self._subscription), name="relay")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for served in list(self.served.values()):
            await served.finish("this gateway is shutting down")
        for view in list(self.views.values()):
            view.lost("the gateway is shutting down")
        if self._subscription is not None:
            await self._subscription.close()

    async def send(self, to: str, **fields: Any) -> bool:
        try:
            await self.store.publish(to, _encode(**fields))
        except StoreUnavailable as exc:
            log.warning("relay to gateway %s: %s", to, exc.detail)
            return False
        return True

    async def _listen(self, subscription: Subscription) -> None:
        while True:
            try:
                raw = await subscription.next()
            except StoreUnavailable as exc:
                log.warning("relay: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            try:
                message = _decode(raw)
            except (ValueError, TypeError) as exc:
                log.warning("relay: a message that does not parse (%r): %.80r", exc, raw)
                continue
            try:
                await self._dispatch(message)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("relay: a malformed %r message (%r)", message.get("op"), exc)
            except (BridgeError, ConnectionError, RuntimeError) as exc:
                log.warning("relay: a %r message failed: %r", message.get("op"), exc)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        view_id, op = message["view"], message["op"]
        if op == "open":
            await self._open(message)
        elif view_id in self.served:
            await self.served[view_id].heard(message)
        elif view_id in self.views:
            self.views[view_id].heard(message)

    # -- the viewing side ----------------------------------------------------------------------

    async def find(self, session_id: str) -> SessionRecord | None:
        """The store's record of `session_id` if another gateway serves it now."""
        try:
            record = await self.store.get_session(session_id)
        except StoreUnavailable as exc:
            log.warning("relay: looking up session %.12s: %s", session_id, exc.detail)
            return None
        if record is None or record.ended or record.attached_by in (None, self.instance):
            return None
        return record

    async def view(self, record: SessionRecord, admin: str, mode: WatchMode) -> RemoteView:
        """Open `admin`'s view of the session `record` names on the gateway serving it; raises
        SessionStartError when that gateway does not answer or no longer has it."""
        view = RemoteView(self, str(record.attached_by), record.id, admin, mode)
        self.views[view.view_id] = view
        try:
            await view.open()
        except BaseException:
            self.views.pop(view.view_id, None)
            raise
        return view

    # -- the serving side ----------------------------------------------------------------------

    async def _open(self, message: dict[str, Any]) -> None:
        peer, view_id = str(message["from"]), message["view"]
        admin, mode = str(message["admin"]), WatchMode(message["mode"])
        session = self.manager.get(str(message["session"])[:64])
        if session is None or not session.ready or session.stream is None or session.ending:
            await self.send(peer, op="error", view=view_id, message="no such live session on its gateway")
            return
        served = _Served(self, peer, view_id, session, admin, mode)
        cols, rows = session.term_size or (80, 24)
        if not await self.send(peer, op="hello", view=view_id, user=session.user.name, cols=cols, rows=rows):
            return
        self.served[view_id] = served
        try:
            served.added = await self.manager.viewing.add(session, admin, mode, served)
        except BridgeError as exc:
            del self.served[view_id]
            await self.send(peer, op="error", view=view_id, message=exc.user_message)
            return
        session.log.info("%s views this session from gateway %s", admin, peer)
        served.tasks = [asyncio.create_task(served.follow(), name=f"relay-{session.id[:8]}")]
        if mode == WatchMode.JOIN:
            served.tasks.append(asyncio.create_task(served.type_in(), name=f"relay-typing-{session.id[:8]}"))


class _Served:
    """A view on another gateway of a session served here: a watcher of its stream whose output
    goes out through the store."""

    def __init__(self, relay: Relay, peer: str, view_id: str, session: Session, admin: str, mode: WatchMode) -> None:
        self.relay = relay
        self.peer = peer
        self.view_id = view_id
        self.session = session
        self.admin = admin
        self.mode = mode
        self.added: tuple[Viewer, Watcher] | None = None
        self.tasks: list[asyncio.Task] = []
        self.heard_at = time.monotonic()
        self.broken = False
        # a join's keystrokes, typed by a task of the view's own: a shell that does not read
        # holds back only this view, never the relay's other messages
        self.typed: asyncio.Queue[bytes] = asyncio.Queue(maxsize=BACKLOG)

    async def _send(self, **fields: Any) -> bool:
        sent = await self.relay.send(self.peer, view=self.view_id, **fields)
        self.broken = self.broken or not sent
        return sent

    async def output(self, data: bytes) -> None:
        if not await self._send(op="out", data=data):
            raise ConnectionError("the relay to the viewing gateway failed")

    async def gap(self, lost: int) -> None:
        if not await self._send(op="gap", lost=lost):
            raise ConnectionError("the relay to the viewing gateway failed")

    async def heard(self, message: dict[str, Any]) -> None:
        self.heard_at = time.monotonic()
        op = message["op"]
        if op == "input" and self.mode == WatchMode.JOIN:
            try:
                self.typed.put_nowait(message["data"])
            except asyncio.QueueFull:
                self.session.log.warning("%s types faster than the shell reads: %d bytes dropped",
                                         self.admin, len(message["data"]))
        elif op == "close":
            await self.finish(None)

    async def type_in(self) -> None:
        while not self.session.ending:
            data = await self.typed.get()
            try:
                await self.relay.manager.viewing.type_as(self.session, data, self.admin)
            except (ConnectionError, RuntimeError) as exc:
                self.session.log.warning("typing of %s from gateway %s failed: %r", self.admin, self.peer, exc)
                return

    async def follow(self) -> None:
        """Pass on size changes and the session's end; say we are alive; let go of a view whose
        gateway went silent."""
        size, said = self.session.term_size, time.monotonic()
        while self.view_id in self.relay.served:
            await asyncio.sleep(FOLLOW_INTERVAL)
            now = time.monotonic()
            if self.session.ending:
                reason = self.session.end_reason or EndReason.KILLED
                await self._send(op="ended", reason=str(reason))
                await self.finish(None)
                return
            if self.broken or now - self.heard_at > DEAD_AFTER:
                self.session.log.warning("the view of %s from gateway %s went silent: let go", self.admin, self.peer)
                await self.finish(None)
                return
            if self.session.term_size is not None and self.session.term_size != size:
                size = self.session.term_size
                await self._send(op="size", cols=size[0], rows=size[1])
            if now - said >= ALIVE_INTERVAL:
                said = now
                await self._send(op="alive")

    async def finish(self, why: str | None) -> None:
        """Stop this view here (idempotent); `why` is told to the viewing gateway."""
        if self.relay.served.pop(self.view_id, None) is None:
            return
        if why is not None:
            await self._send(op="error", message=why)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.added is not None:
            await self.relay.manager.viewing.remove(self.session, *self.added)


class RemoteView:
    """An admin's view here of a session another gateway serves: what `bridge.web.watch` needs
    of a view (size, end, typing, closing), the same as for a session served here."""

    def __init__(self, relay: Relay, peer: str, session_id: str, admin: str, mode: WatchMode) -> None:
        self.relay = relay
        self.peer = peer
        self.id = session_id
        self.view_id = secrets.token_hex(16)
        self.admin = admin
        self.mode = mode
        self.owner = ""
        self.term_size: tuple[int, int] | None = None
        self.ending = False
        self.end_reason: EndReason | None = None
        self.message: str | None = None
        self._inbox: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._lost_bytes = 0
        self._heard_at = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    async def _send(self, **fields: Any) -> bool:
        return await self.relay.send(self.peer, view=self.view_id, **fields)

    def heard(self, message: dict[str, Any]) -> None:
        """A message from the serving gateway (called by the relay's listener, never blocks)."""
        self._heard_at = time.monotonic()
        op = message["op"]
        if op == "out" and len(self._inbox) >= BACKLOG:
            self._lost_bytes += len(message["data"])
            return
        if op == "size":
            self.term_size = (int(message["cols"]), int(message["rows"]))
        elif op == "ended":
            self.ending, self.end_reason = True, EndReason(message["reason"])
        elif op == "error":
            self.lost(str(message.get("message") or "the serving gateway let go of this view"))
        if op in ("hello", "out", "gap", "error"):
            self._inbox.append(message)
            self._arrived.set()

    def lost(self, why: str) -> None:
        self.message, self.ending = why, True
        self._arrived.set()

    async def _next(self) -> dict[str, Any] | None:
        while not self._inbox:
            if self.ending:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        return self._inbox.popleft()

    async def open(self) -> None:
        sent = await self._send(op="open", **{"from": self.relay.instance}, session=self.id, admin=self.admin,
                                mode=str(self.mode))
        try:
            hello = await asyncio.wait_for(self._next(), OPEN_TIMEOUT) if sent else None
        except TimeoutError:
            hello = None
        if hello is None or hello["op"] != "hello":
            why = (hello or {}).get("message") or self.message or "its gateway did not answer"
            raise SessionStartError(f"cannot view this session: {why}", detail=f"relay open {self.id[:12]}: {why}")
        self.owner = str(hello["user"])
        self.term_size = (int(hello["cols"]), int(hello["rows"]))

    async def start(self, sink: WatchSink) -> None:
        """Pass the session's output on to `sink` (the current screen first, as it arrives)."""
        self._tasks = [asyncio.create_task(self._pump(sink), name=f"view-{self.id[:8]}"),
                       asyncio.create_task(self._keep_alive(), name=f"view-alive-{self.id[:8]}")]

    async def _pump(self, sink: WatchSink) -> None:
        try:
            while (message := await self._next()) is not None:
                if self._lost_bytes:
                    lost, self._lost_bytes = self._lost_bytes, 0
                    await sink.gap(lost)
                if message["op"] == "out":
                    await sink.output(message["data"])
                elif message["op"] == "gap":
                    await sink.gap(int(message["lost"]))
        except (ConnectionError, RuntimeError) as exc:
            log.info("a remote view of session %.12s went away while sending: %r", self.id, exc)

    async def _keep_alive(self) -> None:
        while not self.ending:
            await asyncio.sleep(ALIVE_INTERVAL)
            if time.monotonic() - self._heard_at > DEAD_AFTER:
                log.warning("session %.12s: its gateway %s went silent", self.id, self.peer)
                self.lost("the gateway serving this session does not answer")
                return
            await self._send(op="alive")

    async def type(self, data: bytes) -> None:
        await self._send(op="input", data=data)

    async def close(self) -> None:
        """Idempotent."""
        if self.relay.views.pop(self.view_id, None) is None:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.ending:
            await self._send(op="close")
