"""The admin console, for members of `auth.admin_groups`: every live session of the fleet with
its CPU and memory, the warm pool, the audit trail's last events and the recordings, refreshed
over a WebSocket; ending sessions; playing a recording in the page.

Every request and every refresh of the socket asks `current_admin` again, so that someone
removed from the group loses the console at once (an open socket is closed with NOT_ADMIN).
Actions are POSTs with the page's CSRF token and a same-origin Origin, and are audited
(`admin_view`, `admin_kill`). Routes and page links are under `web.base_path` (paths.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ..audit import audit_tail, list_recordings, recording_file
from ..backends.base import Backend, ContainerStats, cpu_percent
from ..errors import BridgeError, StoreUnavailable
from ..vocab import Door
from .http import client_address, origin_allowed, page
from .keys import BACKEND, CONFIG, LOGINS, MANAGER, WEBSOCKETS
from .login import Login, current_admin
from .paths import under
from .watch import NOT_ADMIN

log = logging.getLogger("termbridge.web")

REFRESH = 2.0  # seconds between two snapshots on the console's socket
STATS_TIMEOUT = 5.0  # one Docker reading
SWEEP_EVERY = 1.0  # at most one reading of each container per this many seconds
SWEEP_IDLE = 10.0  # the sweep stops when no console asked for this long
AUDIT_EVENTS = 30  # the audit trail's last events shown
RECORDINGS = 50  # the newest recordings listed
CSRF_PURPOSE = "admin"


class StatsReader:
    """Docker's readings of the fleet's containers, shared by every open console. A sweep in the
    background reads every container a console asked about, at most once a second, while a
    console asked within SWEEP_IDLE; a snapshot takes the latest readings without waiting for
    Docker (which answers a reading only at its next sampling). Keeps each container's reading
    before the latest, since a CPU share is the difference between two."""

    def __init__(self) -> None:
        self._latest: dict[str, ContainerStats] = {}
        self._before: dict[str, ContainerStats] = {}
        self._wanted: list[str] = []
        self._asked = 0.0
        self._sweeper: asyncio.Task[None] | None = None

    def read(self, backend: Backend, container_ids: list[str]) -> dict[str, tuple[ContainerStats, float | None]]:
        """The latest reading of each of these containers that runs, and its CPU share (None
        until two readings exist); starts the sweep when none runs."""
        self._wanted, self._asked = list(container_ids), time.monotonic()
        wanted = set(container_ids)
        for table in (self._latest, self._before):
            for gone in table.keys() - wanted:
                del table[gone]
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(backend), name="console-stats")
        return {cid: (r, cpu_percent(self._before.get(cid), r)) for cid, r in self._latest.items()}

    async def _sweep(self, backend: Backend) -> None:
        while time.monotonic() - self._asked < SWEEP_IDLE:
            started, ids = time.monotonic(), self._wanted
            readings = await asyncio.gather(*(self._read_one(backend, cid) for cid in ids))
            for cid, reading in zip(ids, readings):
                if reading is None:
                    self._latest.pop(cid, None)
                    continue
                if cid in self._latest:
                    self._before[cid] = self._latest[cid]
                self._latest[cid] = reading
            await asyncio.sleep(max(0.0, SWEEP_EVERY - (time.monotonic() - started)))

    @staticmethod
    async def _read_one(backend: Backend, container_id: str) -> ContainerStats | None:
        try:
            async with asyncio.timeout(STATS_TIMEOUT):
                return await backend.stats(container_id)
        except (BridgeError, TimeoutError) as exc:
            log.debug("console: no stats for %s: %s", container_id[:12], getattr(exc, "detail", "timed out"))
            return None

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)


STATS = web.AppKey("console_stats", StatsReader)


def _recorded(record_dir: Path, session_ids: list[str]) -> set[str]:
    """Which of these sessions have a recording (blocking: in a thread)."""
    return {session_id for session_id in session_ids if recording_file(record_dir, session_id) is not None}


class Snapshots:
    """What one console shows, made again at each refresh."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    async def sessions(self) -> list[dict[str, Any]]:
        rows = await self.app[MANAGER].fleet_view()
        ids = [row.pop("container_id", None) for row in rows]
        stats = self.app[STATS].read(self.app[BACKEND], [cid for cid in ids if cid])
        record_dir = self.app[CONFIG].audit.record_dir
        recorded = await asyncio.to_thread(_recorded, record_dir, [r["id"] for r in rows]) if record_dir else set()
        for row, cid in zip(rows, ids):
            row["cpu_percent"] = row["memory"] = row["memory_limit"] = None
            if cid in stats:
                reading, share = stats[cid]
                row.update(cpu_percent=share, memory=reading.memory_bytes, memory_limit=reading.memory_limit or None)
            row["recording"] = row["id"] in recorded
        return rows

    def pool(self) -> dict[str, int] | None:
        pool = self.app[MANAGER].pool
        if pool is None:
            return None
        return {"size": pool.size, "ready": len(pool.ready), "filling": pool.filling}

    async def make(self) -> dict[str, Any]:
        config = self.app[CONFIG]
        audit = await asyncio.to_thread(audit_tail, Path(config.audit.log), AUDIT_EVENTS) if config.audit.log else None
        recordings = (
            await asyncio.to_thread(list_recordings, config.audit.record_dir, RECORDINGS)
            if config.audit.record_dir is not None else None
        )
        return {
            "type": "snapshot",
            "at": time.time(),
            "gateway": self.app[MANAGER].gateway,
            "sessions": await self.sessions(),
            "pool": self.pool(),
            "audit": audit,
            "recordings": recordings,
        }


async def console_page(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    _viewed(request, login, "console")
    return page(request, "console.html", user=login.user.name,
                csrf=request.app[LOGINS].form_token(CSRF_PURPOSE, login.id))


def _viewed(request: web.Request, login: Login, what: str) -> None:
    request.app[MANAGER].observers.admin_viewed(login.user.name, client_address(request), Door.WEB, what)


async def _still_admin(request: web.Request) -> str | None:
    """None while the request's login is an admin; else why not, in words for the page."""
    try:
        await current_admin(request)
    except web.HTTPException as exc:
        return exc.text or "not allowed"
    return None


async def console_socket(request: web.Request) -> web.StreamResponse:
    """A snapshot every REFRESH seconds; the admin check runs before each one."""
    login = await current_admin(request)
    if not origin_allowed(request, required=True):
        log.warning("console socket of %s refused: Origin %r", login.user.name, request.headers.get("Origin"))
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    snapshots = Snapshots(request.app)
    refresher = asyncio.create_task(_refresh(request, ws, snapshots, login))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break  # the page sends nothing that matters: the refresher does the work
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
    return ws


async def _refresh(request: web.Request, ws: web.WebSocketResponse, snapshots: Snapshots, login: Login) -> None:
    while not ws.closed:
        refused = await _still_admin(request)
        if refused is not None:
            log.info("console socket of %s closed: %s", login.user.name, refused)
            await ws.send_json({"type": "denied", "message": refused})
            await ws.close(code=NOT_ADMIN, message=b"not an admin")
            return
        try:
            await ws.send_json(await snapshots.make())
        except StoreUnavailable as exc:
            log.error("console of %s: %s", login.user.name, exc.detail)
            await ws.send_json({"type": "error", "message": exc.user_message})
        except ConnectionError:
            return
        await asyncio.sleep(REFRESH)


async def end_sessions(request: web.Request) -> web.StreamResponse:
    """POST `session=ID` (one session) or `user=NAME` (every session of theirs), with the page's
    CSRF token: each ends with reason `killed`, and each kill is audited with who and whom."""
    login = await current_admin(request)
    if not origin_allowed(request, required=True):
        log.warning("console kill by %s refused: Origin %r", login.user.name, request.headers.get("Origin"))
        raise web.HTTPForbidden(text="cross-origin request refused")
    form = await request.post()
    if not request.app[LOGINS].form_token_ok(CSRF_PURPOSE, login.id, str(form.get("csrf", ""))):
        log.warning("console kill by %s refused: missing or wrong CSRF token", login.user.name)
        raise web.HTTPForbidden(text="This page has expired: reload it and try again.")
    session_id, user = str(form.get("session", ""))[:64], str(form.get("user", ""))[:64]
    manager = request.app[MANAGER]
    try:
        rows = await manager.fleet_view()
    except StoreUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=exc.user_message) from None
    targets = [r for r in rows if (session_id and r["id"] == session_id) or (user and not session_id and r["user"] == user)]
    if not targets:
        raise web.HTTPNotFound(text="No such live session.")
    rhost, admin = client_address(request), login.user.name
    for row in targets:
        manager.observers.admin_killed(admin, rhost, row["id"], row["user"])
    ended = await asyncio.gather(*(manager.end_session(r["id"], f"admin {admin} (console)") for r in targets))
    return web.json_response({"killed": [r["id"] for r, done in zip(targets, ended) if done]})


def _recording(request: web.Request) -> tuple[str, Path]:
    """The `session` query parameter and its recording file; 404 for anything else."""
    record_dir = request.app[CONFIG].audit.record_dir
    session_id = request.query.get("session", "")
    path = recording_file(record_dir, session_id) if record_dir is not None else None
    if path is None:
        log.info("recording %r asked for by %s: none", session_id[:80], client_address(request))
        raise web.HTTPNotFound(text="No such recording.")
    return session_id, path


async def recording(request: web.Request) -> web.StreamResponse:
    """The asciicast file as it is now (a live session's grows)."""
    login = await current_admin(request)
    session_id, path = _recording(request)
    _viewed(request, login, f"recording {session_id}")
    return web.FileResponse(path, headers={"Content-Type": "application/x-asciicast", "Cache-Control": "no-store"})


async def player_page(request: web.Request) -> web.StreamResponse:
    login = await current_admin(request)
    session_id, _ = _recording(request)
    return page(request, "player.html", wasm=True, user=login.user.name, session=session_id)


async def _stop_stats(app: web.Application) -> None:
    await app[STATS].stop()


def setup_routes(app: web.Application) -> None:
    app[STATS] = StatsReader()
    app.on_shutdown.append(_stop_stats)
    app.router.add_get(under(app, "admin"), console_page)
    app.router.add_get(under(app, "admin/ws"), console_socket)
    app.router.add_post(under(app, "admin/end"), end_sessions)
    app.router.add_get(under(app, "admin/recording"), recording)
    app.router.add_get(under(app, "admin/play"), player_page)

