"""Admins watching or joining someone's live session: the pages `admin/watch/ID` and
`admin/join/ID` and their sockets (`.../ws`). A watch is read-only; a join passes the admin's
keystrokes to the shell, recorded as theirs. Every request and socket checks the admin group
(`current_admin`), and a live socket checks it again every ADMIN_RECHECK seconds, so that
removing someone from the group ends their views at once. The owner is told by the manager.
A session another gateway sharing the store serves is viewed through the relay
(`bridge.relay`): the same socket code, with a `RemoteView` for the `LocalView`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from aiohttp import WSCloseCode, WSMsgType, web

from .. import wsproto
from ..errors import BridgeError
from ..session import Session, Viewer
from ..sessions import SessionManager
from ..store import SessionRecord
from ..stream import Watcher, WatchSink
from ..vocab import EndReason, WatchMode
from .http import client_address, expected_origin, origin_allowed, page
from .keys import CONFIG, MANAGER, RELAY, WEBSOCKETS
from .login import current_admin
from .paths import under

log = logging.getLogger("termbridge.web")

ADMIN_RECHECK = 2.0  # how soon a view ends after its admin left the admin groups or logged out
FOLLOW_INTERVAL = 0.25  # how soon a view follows the session's size, and hears that it ended
NOT_ADMIN = 4003  # close code: the admin check failed on a live view
READ_ONLY = "this view is read-only: join the session to type"


def _mode(request: web.Request) -> WatchMode:
    return WatchMode(request.match_info["mode"])


def _live(manager: SessionManager, session_id: str) -> Session | None:
    """A live terminal session of this gateway (either door, once its shell runs)."""
    session = manager.get(session_id[:64])
    return session if session is not None and session.ready else None


async def _find(request: web.Request, session_id: str) -> Session | SessionRecord | None:
    """The live session `session_id`: this gateway's, or the store's record of it when another
    gateway sharing the store serves it (reached through the relay)."""
    session = _live(request.app[MANAGER], session_id)
    if session is not None:
        return session
    relay = request.app.get(RELAY)
    return await relay.find(session_id[:64]) if relay is not None else None


class View(Protocol):
    """What a watch socket needs of the session it shows, here or on another gateway."""

    id: str
    owner: str
    term_size: tuple[int, int] | None
    ending: bool
    end_reason: EndReason | None
    message: str | None  # why the view ended, when it was not the session's end

    async def start(self, sink: WatchSink) -> None: ...

    async def type(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class LocalView:
    """A view of a session this gateway serves: a viewer added by the manager."""

    def __init__(self, manager: SessionManager, session: Session, admin: str, mode: WatchMode) -> None:
        self.manager, self.session, self.admin, self.mode = manager, session, admin, mode
        self.id, self.owner, self.message = session.id, session.user.name, None
        self._added: tuple[Viewer, Watcher] | None = None

    @property
    def term_size(self) -> tuple[int, int] | None:
        return self.session.term_size

    @property
    def ending(self) -> bool:
        return self.session.ending

    @property
    def end_reason(self) -> EndReason | None:
        return self.session.end_reason

    async def start(self, sink: WatchSink) -> None:
        self._added = await self.manager.viewing.add(self.session, self.admin, self.mode, sink)

    async def type(self, data: bytes) -> None:
        await self.manager.viewing.type_as(self.session, data, self.admin)

    async def close(self) -> None:
        if self._added is not None:
            await self.manager.viewing.remove(self.session, *self._added)


async def watch_page(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    session_id = request.match_info["id"]
    found = await _find(request, session_id)
    if found is None:
        raise web.HTTPNotFound(text="No such live session (it ended).")
    owner = found.user.name if isinstance(found, Session) else found.user
    mode = _mode(request)
    return page(
        request, "watch.html", admin=login.user.name, owner=owner, session=found.id, mode=str(mode),
        other="join" if mode == WatchMode.WATCH else "watch",
    )


class WatchSocketSink:
    """The admin's socket as a stream watcher."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    async def output(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def gap(self, lost: int) -> None:
        await self.ws.send_str(wsproto.gap_message(lost))


async def _open_view(request: web.Request, admin: str, mode: WatchMode) -> View:
    """The view of the requested session: of this gateway's, or relayed from the one serving it."""
    found = await _find(request, request.match_info["id"])
    if isinstance(found, Session):
        return LocalView(request.app[MANAGER], found, admin, mode)
    if found is not None:
        try:
            return await request.app[RELAY].view(found, admin, mode)
        except BridgeError as exc:
            log.warning("watch of session %.12s by %s: %s", found.id, admin, exc.detail)
    raise web.HTTPNotFound(text="no such live session")


async def watch_socket(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    if not origin_allowed(request, required=True):
        log.warning("watch WebSocket refused: Origin %r, expected %r", request.headers.get("Origin"),
                    expected_origin(request))
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    mode, admin = _mode(request), login.user.name
    view = await _open_view(request, admin, mode)
    try:
        return await _serve_view(request, view, admin, mode)
    finally:
        await view.close()


async def _serve_view(request: web.Request, view: View, admin: str, mode: WatchMode) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=request.app[CONFIG].web.max_message_size, heartbeat=30, compress=False)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    cols, rows = view.term_size or (80, 24)
    await ws.send_str(wsproto.watch_message(view.id, view.owner, str(mode), cols, rows))
    try:
        await view.start(WatchSocketSink(ws))
    except BridgeError as exc:  # it ended meanwhile
        await ws.send_str(wsproto.error_message(exc.user_message))
        await ws.close(code=WSCloseCode.OK, message=b"session ended")
        return ws
    log.info("%s %s session %.12s of %s from %s", admin, mode, view.id, view.owner, client_address(request))
    follow = asyncio.create_task(_follow(request, ws, view, (cols, rows)))
    told_read_only = False
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if mode == WatchMode.JOIN:
                    await view.type(msg.data)
                elif not told_read_only:
                    told_read_only = True
                    await ws.send_str(wsproto.error_message(READ_ONLY))
            elif msg.type == WSMsgType.ERROR:
                break
    except (ConnectionError, asyncio.TimeoutError) as exc:
        log.info("watch WebSocket of %s dropped: %r", admin, exc)
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    return ws


async def _follow(request: web.Request, ws: web.WebSocketResponse, view: View, size: tuple[int, int]) -> None:
    """While the view lives: pass on the session's size, close the view when the session ends,
    and check every ADMIN_RECHECK seconds that its admin still is one (and still logged in)."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + ADMIN_RECHECK
    while not ws.closed:
        await asyncio.sleep(FOLLOW_INTERVAL)
        if view.ending:
            reason = view.end_reason if view.end_reason in wsproto.EXIT_REASONS else EndReason.KILLED
            await ws.send_str(wsproto.exit_message(None, reason or EndReason.KILLED, view.message or "the session ended"))
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
            return
        if view.term_size is not None and view.term_size != size:
            size = view.term_size
            await ws.send_str(wsproto.size_message(*size))
        if loop.time() >= next_check:
            next_check = loop.time() + ADMIN_RECHECK
            try:
                await current_admin(request)
            except web.HTTPException as exc:
                log.warning("watch of session %.12s ended: the admin check now says %d", view.id, exc.status)
                await ws.send_str(wsproto.error_message("you are no longer allowed to watch sessions"))
                await ws.close(code=NOT_ADMIN, message=b"not an admin")
                return


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, r"admin/{mode:watch|join}/{id:[0-9a-f]{1,64}}"), watch_page)
    app.router.add_get(under(app, r"admin/{mode:watch|join}/{id:[0-9a-f]{1,64}}/ws"), watch_socket)
