"""The admin socket: `termbridge sessions list|kill` and `termbridge homes list|du|rm` talk to the
running gateway through it (homes too: the gateway holds the per-person locks its logins take).

Requests: `{"command": "list"}`; `{"command": "kill"}` with `"id"` (a unique prefix), `"user"`
(every session of that name) or `"all": true`. Answers: `{"sessions": [...]}` (the keys of
`SESSION_KEYS`), `{"killed": [ids]}`, or `{"error": text}`.

A unix socket in `state_dir` (itself 0700), mode 0600, and the peer's uid checked with
SO_PEERCRED: only root (or the gateway's own user) gets in. One JSON request line, one JSON
answer line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import socket
import struct
from pathlib import Path
from typing import Any

from .errors import StoreUnavailable
from .homes import HomeError
from .sessions import SessionManager

log = logging.getLogger("termbridge.admin")

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 4096
# Every row of a listing has these keys, in this order (`termbridge sessions list --json`).
SESSION_KEYS = ("id", "user", "door", "profile", "gateway", "started", "idle_seconds", "container", "attached")


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class AdminServer:
    def __init__(self, manager: SessionManager, path: Path) -> None:
        self.manager = manager
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = _peer_uid(writer)
            if uid not in (0, os.geteuid()):
                log.warning("admin socket: refused peer uid %s", uid)
                answer: dict[str, Any] = {"error": "permission denied"}
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), 10)
                    answer = await self.dispatch(json.loads(line))
                except (ValueError, asyncio.LimitOverrunError, TimeoutError):
                    answer = {"error": "bad request"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def dispatch(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"error": "bad request"}
        command = request.get("command")
        try:
            if command == "list":
                return {"sessions": list((await self._fleet()).values())}
            if command == "kill":
                return await self._kill(request)
            if command == "homes":
                return await self._homes(request)
        except HomeError as exc:
            log.error("admin %s: %s", str(command)[:40], exc.detail)
            return {"error": exc.user_message}
        except StoreUnavailable as exc:
            log.error("admin %s: %s", str(command)[:40], exc.detail)
            return {"error": exc.user_message}
        return {"error": f"unknown command {str(command)[:40]!r}"}

    async def _fleet(self) -> dict[str, dict[str, Any]]:
        """Every session of every gateway sharing the store, by id, oldest first (another
        gateway's idle time is as of its last write to the store)."""
        return {row["id"]: {key: row[key] for key in SESSION_KEYS} for row in await self.manager.fleet_view()}

    async def _kill(self, request: dict[str, Any]) -> dict[str, Any]:
        """`kill` one session by id prefix, or every one with `all`: this gateway's directly,
        another gateway's through the store (`SessionManager.request_kill`)."""
        fleet = await self._fleet()
        if request.get("all") is True:
            targets = list(fleet)
        elif "user" in request:
            name = str(request["user"])[:256]
            targets = [session_id for session_id, row in fleet.items() if row["user"] == name]
            if not targets:
                return {"error": await _no_sessions_of(name)}
        else:
            prefix = str(request.get("id", ""))
            targets = [session_id for session_id in fleet if prefix and session_id.startswith(prefix)]
            if not targets:
                return {"error": f"no live session {prefix!r}"}
            if len(targets) > 1:
                return {"error": f"{prefix!r} matches {len(targets)} sessions; give more of the id"}
        await asyncio.gather(*(self.manager.end_session(session_id, "an administrator (termbridge sessions kill)")
                               for session_id in targets))
        return {"killed": targets}


    async def _homes(self, request: dict[str, Any]) -> dict[str, Any]:
        """`list` (every home) or `du` (one person's with `user`, else every one): size and use;
        `rm`: remove one person's home, refused while they have a session on any gateway."""
        homes = self.manager.homes.store
        action, name = request.get("action"), request.get("user")
        if action not in ("list", "du", "rm"):
            return {"error": f"unknown homes action {str(action)[:40]!r}"}
        if name is None and action != "rm":
            infos = [await asyncio.to_thread(homes.info, uid) for uid in await asyncio.to_thread(homes.uids)]
            return {"homes": [info.as_json() for info in infos]}
        if not isinstance(name, str) or not name:
            return {"error": "name the user"}
        uid = await asyncio.to_thread(_uid_of, name)
        if uid is None:
            return {"error": f"no such user {name[:64]!r} (a number is taken as a uid)"}
        if not homes.image(uid).exists():
            return {"error": f"{name[:64]} has no home"}
        if action != "rm":
            return {"homes": [(await asyncio.to_thread(homes.info, uid)).as_json()]}
        user = name if not name.isdigit() else await asyncio.to_thread(homes.owner, uid)
        live = [s for s in (await self._fleet()).values() if s["user"] == user]
        slots = [slot for slot in (await self.manager.store.list_slots()).values() if slot.user == user] \
            if self.manager.store is not None else []
        if live or slots or self.manager.count_for(user):
            count = max(len(live), len(slots), self.manager.count_for(user))
            return {
                "error": f"{user} has {count} live session(s); end them first (termbridge sessions kill --user {user})"
            }
        await asyncio.to_thread(homes.remove, uid, lambda: self.manager.homes.in_use(uid))
        log.info("home of %s (uid %d) removed by an administrator", user, uid)
        return {"removed": uid}


def _uid_of(name: str) -> int | None:
    """A login name's host uid; a number is a uid already (the home of a deleted account)."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


async def _no_sessions_of(name: str) -> str:
    """Why a kill by user name ended nothing: a name with no account here is likely a typo."""
    try:
        await asyncio.to_thread(pwd.getpwnam, name)
    except KeyError:
        return f"no such user {name!r}, and no live session of that name"
    return f"no live session of {name!r}"


def request(path: Path, payload: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """The CLI's side: one request, one answer (blocking; the CLI has no event loop)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
