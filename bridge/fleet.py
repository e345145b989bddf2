"""The fleet's housekeeping: the reaper (containers nothing owns, on one gateway or across all
that share a store), sessions whose host went away, the fleet-wide view of sessions, and admin
kills of sessions another gateway serves."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any, Protocol

from .backends.base import LABEL_GATEWAY, LABEL_STARTED, Backend, ContainerInfo
from .config import Config
from .errors import BridgeError, StoreUnavailable
from .observers import Observers
from .pool import WarmPools, pool_slot
from .session import Session
from .store import SessionRecord, Store
from .vocab import EndReason

log = logging.getLogger("termbridge.sessions")

FLEET_INTERVAL = 1.0  # how often a gateway looks for kill requests on its sessions in the store
REAP_GRACE = 60.0  # a fleet container younger than this is left alone: its start may be in flight
# How often a gateway asks the backend for containers whose host went away. A dead node's TCP
# connections go silent rather than close: SSH keepalives alone would take minutes to notice.
HOST_INTERVAL = 2.0
HOST_LOST = "the server running your session went away; your session has ended"


def _age(info: ContainerInfo, now: float) -> float:
    """Seconds since the container's start label (0 when it has none: treated as new)."""
    try:
        started = datetime.fromisoformat(info.labels.get(LABEL_STARTED, ""))
    except ValueError:
        return 0.0
    return now - started.timestamp()


def format_idle(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h10m`; `-` when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows (the first one the header) as lines of left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_sessions(sessions: list[dict[str, Any]]) -> list[str]:
    """The session table of `termbridge sessions list` (and of the SSH door's `sessions`)."""
    rows = [("ID", "USER", "DOOR", "PROFILE", "CONTAINER", "STARTED", "IDLE", "GATEWAY")]
    for s in sessions:
        rows.append((
            s["id"], s["user"], s["door"], s["profile"], s["container"] or "-", s["started"],
            format_idle(s["idle_seconds"]), s["gateway"],
        ))
    return format_table(rows)


def _from_record(record: SessionRecord, now: float) -> dict[str, Any]:
    """A session another gateway serves, as its record in the store has it."""
    return {
        "id": record.id,
        "user": record.user,
        "door": record.door,
        "container": record.container_name or None,
        "container_id": record.container_id or None,
        "started": datetime.fromtimestamp(record.started, timezone.utc).isoformat(timespec="seconds"),
        "idle_seconds": round(max(0.0, now - record.last_activity), 1),  # as last written (every few seconds)
        "attached": record.attached_by is not None,
        "gateway": record.gateway,
        "profile": record.profile,
        "bytes_in": record.bytes_in,  # as last written (every few seconds)
        "bytes_out": record.bytes_out,
    }


class Manager(Protocol):
    """What the housekeeping needs of the session manager (which imports this module)."""

    config: Config
    backend: Backend
    store: Store | None
    gateway: str
    sessions: dict[str, Session]
    pool: WarmPools | None
    observers: Observers

    async def forget(self, session_id: str) -> None: ...

    async def kill(self, session: Session) -> None: ...

    async def end(self, session: Session, reason: EndReason, code: int | None = None, message: str | None = None) -> None: ...

    def removing(self, session_id: str) -> bool: ...


class FleetKeeper:
    """One gateway's share of the fleet's housekeeping, on behalf of its session manager."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def reap(self) -> int:
        """Remove containers that nothing owns; with a store, fleet-wide (see `_unowned`)."""
        live = {s.container.id for s in self.manager.sessions.values() if s.container} | set(self.manager.sessions)
        if self.manager.pool is not None:
            live |= self.manager.pool.ids()
        if self.manager.store is None:
            unowned = [info for info in await self.manager.backend.list_own() if not ({info.id, info.session_id} & live)]
        else:
            unowned = await self._unowned(self.manager.store, live)
        for info in unowned:
            log.info("reaping container %s (session %s, user %s)", info.name, info.session_id[:12], info.user)
            await self.manager.backend.stop(info.id)
            await self.manager.forget(info.session_id)
            await self.manager.forget(pool_slot(info.session_id))
        if unowned:
            self.manager.observers.containers_reaped(len(unowned))
        return len(unowned)

    async def _unowned(self, store: Store, live: set[str]) -> list[ContainerInfo]:
        """The fleet's containers nothing owns. This gateway's memory owns its live sessions;
        another gateway's session record owns its container until the session's lifetime is over
        (a record of this gateway not in its memory is a previous run's: reaped). Another
        gateway's container without a record is owned by its slot while that is younger than a
        start may take (a pooled container's slot, user None, owns it for good), and by nothing
        after REAP_GRACE when it has no slot. Slots and records that own no container are
        released once they are that old (their gateway died)."""
        now, stale = time.time(), 2 * self.manager.config.session.start_timeout + REAP_GRACE
        records = {r.id: r for r in await store.list_sessions()}
        slots = await store.list_slots()
        # This gateway's own too: containers from before it labelled its fleet are its alone.
        containers = list({c.id: c for c in [*await self.manager.backend.list_fleet(), *await self.manager.backend.list_own()]}.values())
        unowned = []
        for info in containers:
            if {info.id, info.session_id} & live:
                continue
            record = records.get(info.session_id)
            mine = info.labels.get(LABEL_GATEWAY) == self.manager.gateway
            if record is not None and now < record.lifetime_deadline and not record.ended and (
                record.gateway != self.manager.gateway or record.attached_by is None  # another's, or waiting for its page
            ):
                continue
            if record is None and not mine:
                slot = slots.get(info.session_id) or slots.get(pool_slot(info.session_id))
                if _age(info, now) < REAP_GRACE or (slot is not None and (slot.user is None or now - slot.since < stale)):
                    continue
            unowned.append(info)
        held = {info.session_id for info in containers} | live
        for slot_id, slot in slots.items():
            session_id = slot_id.removeprefix("pool-")
            if session_id not in held and session_id not in records and now - slot.since > stale:
                log.info("releasing slot %.17s of %s: no container, no session", slot_id, slot.user or "the pool")
                await self.manager.forget(slot_id)
        for record in records.values():
            if record.id not in held and now - record.started > stale:
                log.info("forgetting session %.12s of %s: its container is gone", record.id, record.user)
                await self.manager.forget(record.id)
        return unowned

    async def end_lost_hosts(self) -> int:
        """End this gateway's sessions whose host went away (reason `error`, the person told why);
        ending removes their containers (a Swarm service goes at once, its task with the node)."""
        lost = await self.manager.backend.unreachable()
        ended = 0
        for session in list(self.manager.sessions.values()):
            if session.container is not None and session.container.id in lost and not session.ending:
                session.log.warning("host of container %s went away", session.container.name)
                await self.manager.end(session, EndReason.ERROR, message=HOST_LOST)
                ended += 1
        return ended

    async def watch_hosts(self, interval: float = HOST_INTERVAL) -> None:
        """Forever: `end_lost_hosts`. While the backend cannot answer (a Swarm without quorum),
        running sessions go on and the next round asks again."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.end_lost_hosts()
            except BridgeError as exc:
                log.warning("host watch: %s", exc.detail)
            except Exception:  # noqa: BLE001 (the watch must outlive one bad round)
                log.exception("host watch: this round failed; the next one asks again")

    async def watch_fleet(self, interval: float = FLEET_INTERVAL) -> None:
        """Forever: end this gateway's sessions that another gateway's admin asked to end
        (`ended` set on the record, see `request_kill`)."""
        store = self.manager.store
        if store is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                records = await store.list_sessions()
            except StoreUnavailable as exc:
                log.warning("fleet watch: %s", exc.detail)
                continue
            for record in records:
                session = self.manager.sessions.get(record.id)
                if record.ended and session is not None and not session.ending:
                    session.log.info("killed by an administrator on another gateway")
                    await self.manager.kill(session)

    async def view(self) -> list[dict[str, Any]]:
        """Every live session of every gateway sharing the store, oldest first, as the admin
        socket, the console and the SSH door's `sessions` show them: this gateway's from its
        memory, the others' from their records."""
        records = {r.id: r for r in await self.fleet()}
        now = time.time()
        found: dict[str, dict[str, Any]] = {}
        for session in self.manager.sessions.values():
            row = session.describe()  # its profile included
            row["idle_seconds"] = row.pop("idle_for")
            found[session.id] = row | {"gateway": self.manager.gateway}
        for record in records.values():
            if record.id not in found and not record.ended and not self.manager.removing(record.id):
                found[record.id] = _from_record(record, now)
        return sorted(found.values(), key=lambda row: row["started"])

    async def fleet(self) -> list[SessionRecord]:
        """Every session of every gateway sharing the store (this one's only, without a store)."""
        if self.manager.store is None:
            return []
        return await self.manager.store.list_sessions()

    async def end_session(self, session_id: str, by: str = "an administrator") -> bool:
        """End one live session of the fleet (reason `killed`; its person is told an administrator
        ended it): this gateway's directly, another gateway's through the store. False when no
        live session has that id."""
        session = self.manager.sessions.get(session_id)
        if session is not None:
            session.log.info("killed by %s", by)
            await self.manager.kill(session)
            return True
        store = self.manager.store
        record = await store.get_session(session_id) if store is not None else None
        if record is None or record.ended:
            return False
        log.info("session %.12s of %s on gateway %s: kill requested by %s", session_id, record.user, record.gateway, by)
        await self.request_kill(record)
        return True

    async def request_kill(self, record: SessionRecord, wait: float = 5.0) -> None:
        """End a session another gateway serves: ask it through the store; if it has not ended
        the session within `wait` s (that gateway is gone), remove the container here."""
        store = self.manager.store
        if store is None or not await store.update_session(record.id, ended=True):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if await store.get_session(record.id) is None:
                return
        log.warning("session %.12s: gateway %s did not end it; removing its container", record.id, record.gateway)
        await self.manager.backend.stop(record.container_id)
        await self.manager.forget(record.id)
