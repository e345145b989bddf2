"""Admins watching or joining someone's live session: the pages `admin/watch/ID` and
`admin/join/ID` and their sockets (`.../ws`). A watch is read-only; a join passes the admin's
keystrokes to the shell, recorded as theirs. Every request and socket checks the admin group
(`current_admin`), and a live socket checks it again every ADMIN_RECHECK seconds, so that
removing someone from the group ends their views at once. The owner is told by the manager.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from .. import wsproto
from ..errors import BridgeError
from ..session import Session
from ..sessions import SessionManager
from ..vocab import EndReason, WatchMode
from .http import client_address, expected_origin, origin_allowed, page
from .keys import CONFIG, MANAGER, WEBSOCKETS
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
    """A live terminal session of this gateway (an SSH-door session has no stream to watch)."""
    session = manager.get(session_id[:64])
    return session if session is not None and session.ready else None


async def watch_page(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    session_id = request.match_info["id"]
    session = _live(request.app[MANAGER], session_id)
    if session is None:
        raise web.HTTPNotFound(text="No such live session on this gateway (it ended, or runs on another one).")
    mode = _mode(request)
    return page(
        request, "watch.html", admin=login.user.name, owner=session.user.name, session=session.id, mode=str(mode),
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


async def watch_socket(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    if not origin_allowed(request, required=True):
        log.warning("watch WebSocket refused: Origin %r, expected %r", request.headers.get("Origin"),
                    expected_origin(request))
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    manager = request.app[MANAGER]
    session = _live(manager, request.match_info["id"])
    if session is None:
        raise web.HTTPNotFound(text="no such live session on this gateway")
    mode, admin = _mode(request), login.user.name
    ws = web.WebSocketResponse(max_msg_size=request.app[CONFIG].web.max_message_size, heartbeat=30, compress=False)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    cols, rows = session.term_size or (80, 24)
    await ws.send_str(wsproto.watch_message(session.id, session.user.name, str(mode), cols, rows))
    try:
        viewer, watcher = await manager.add_viewer(session, admin, mode, WatchSocketSink(ws))
    except BridgeError as exc:  # it ended meanwhile
        await ws.send_str(wsproto.error_message(exc.user_message))
        await ws.close(code=WSCloseCode.OK, message=b"session ended")
        return ws
    log.info("%s %s session %.12s of %s from %s", admin, mode, session.id, session.user.name, client_address(request))
    follow = asyncio.create_task(_follow(request, ws, session, (cols, rows)))
    told_read_only = False
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if mode == WatchMode.JOIN:
                    await _type(session, msg.data, admin)
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
        await manager.remove_viewer(session, viewer, watcher)
    return ws


async def _type(session: Session, data: bytes, admin: str) -> None:
    """A joined admin's keystrokes to the shell, recorded as theirs; an ending session drops them."""
    try:
        if session.feed(data, by=admin):
            await session.drain()
    except ConnectionError:
        if not session.ending:
            raise


async def _follow(request: web.Request, ws: web.WebSocketResponse, session: Session, size: tuple[int, int]) -> None:
    """While the view lives: pass on the session's size, close the view when the session ends,
    and check every ADMIN_RECHECK seconds that its admin still is one (and still logged in)."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + ADMIN_RECHECK
    while not ws.closed:
        await asyncio.sleep(FOLLOW_INTERVAL)
        if session.ending:
            reason = session.end_reason if session.end_reason in wsproto.EXIT_REASONS else EndReason.KILLED
            await ws.send_str(wsproto.exit_message(None, reason or EndReason.KILLED, "the session ended"))
            await ws.close(code=WSCloseCode.OK, message=b"session ended")
            return
        if session.term_size is not None and session.term_size != size:
            size = session.term_size
            await ws.send_str(wsproto.size_message(*size))
        if loop.time() >= next_check:
            next_check = loop.time() + ADMIN_RECHECK
            try:
                await current_admin(request)
            except web.HTTPException as exc:
                log.warning("watch of session %.12s ended: the admin check now says %d", session.id, exc.status)
                await ws.send_str(wsproto.error_message("you are no longer allowed to watch sessions"))
                await ws.close(code=NOT_ADMIN, message=b"not an admin")
                return


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, r"admin/{mode:watch|join}/{id:[0-9a-f]{1,64}}"), watch_page)
    app.router.add_get(under(app, r"admin/{mode:watch|join}/{id:[0-9a-f]{1,64}}/ws"), watch_socket)
