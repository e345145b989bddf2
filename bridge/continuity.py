"""Sessions outlive the gateway: what a gateway writes to the store so that the next one (after a
restart, or a sibling replica) can serve its web sessions, and how it takes them back.

The shell itself survives in its container (the session holder keeps it and its recent output);
what the store keeps is the session's record (owner, container, clocks, who is attached) and its
reconnect secret (the client key, sealed, and the pinned host key). `attached_by` is a lease:
a gateway serving a session holds it, one that lets go clears it, one that sees another gateway
take it lets its own attachment go, and ending a session nobody came back for is a
compare-and-set on it, so that exactly one replica does it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import asyncssh

from .backends.base import Container
from .config import SessionConfig
from .errors import BridgeError
from .session import Session
from .store import SessionRecord, SessionSecret, Store
from .upstream import SessionKeys

log = logging.getLogger("termbridge.continuity")

# The idle clock reaches the store at most this often per session (never per keystroke); a
# restarted gateway's idle end is late by at most this much.
ACTIVITY_WRITE_INTERVAL = 5.0
# How often a gateway checks that the sessions it serves are still its own (another window on
# another replica may have taken one over): the old window hears of it within this.
LEASE_CHECK_INTERVAL = 2.0
STORE_TIMEOUT = 5.0
TAKE_ATTEMPTS = 5


@dataclass(frozen=True)
class Adoptable:
    """What it takes to serve a session another gateway process started."""

    record: SessionRecord
    container: Container
    keys: SessionKeys


def wall_from_monotonic(mono: float) -> float:
    return time.time() - (time.monotonic() - mono)


def monotonic_from_wall(wall: float) -> float:
    return time.monotonic() - (time.time() - wall)


def _progress(session: Session) -> tuple[float, int, int]:
    """What `write_activity` keeps the store's record of: the idle clock and the byte counts."""
    return session.last_activity, session.bytes_in, session.bytes_out


class Continuity:
    """The store side of one gateway's sessions. Store trouble never breaks a running session:
    it is logged, and the session only loses its chance to outlive this process."""

    def __init__(self, store: Store, instance: str, config: SessionConfig) -> None:
        self.store = store
        self.instance = instance
        self.config = config
        self._written_activity: dict[str, tuple[float, int, int]] = {}

    async def _safely(self, what: str, session_id: str, call: Awaitable[object]) -> object | None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                return await call
        except (BridgeError, TimeoutError) as exc:
            detail = getattr(exc, "detail", None) or repr(exc)
            log.warning("store: %s of session %.12s failed: %s", what, session_id, detail)
            return None

    async def started(self, session: Session) -> None:
        """A session became ready (the manager wrote its record): for a web session, which can
        come back, the secret to reconnect to its container; its idle clock is written from now on."""
        self._written_activity[session.id] = _progress(session)
        if session.keys is not None and session.door == "web":
            secret = SessionSecret(
                client_key=session.keys.client_key.export_private_key("openssh"),
                host_key=session.keys.host_key.export_public_key("openssh"),
            )
            await self._safely("recording the secret", session.id, self.store.put_secret(session.id, secret))

    def note_adopted(self, session: Session) -> None:
        """`session` is served here now (its record was taken with `take`)."""
        self._written_activity[session.id] = _progress(session)

    async def forget(self, session_id: str) -> None:
        """The session ended and its container is gone."""
        self._written_activity.pop(session_id, None)
        await self._safely("forgetting", session_id, self.store.delete_session(session_id))

    async def release(self, session_id: str) -> None:
        """This gateway lets go of a session that goes on running (shutdown with `keep`)."""
        self._written_activity.pop(session_id, None)
        await self._safely(
            "releasing",
            session_id,
            self.store.update_session(session_id, expect={"attached_by": self.instance}, attached_by=None,
                                      attached_at=time.time()),
        )

    async def find(self, session_id: str) -> SessionRecord | None:
        rec = await self._safely("looking up", session_id, self.store.get_session(session_id))
        return rec if isinstance(rec, SessionRecord) and not rec.ended else None

    async def load(self, rec: SessionRecord) -> Adoptable | None:
        """The container and keys of `rec`, or None when its secret is missing or unreadable."""
        secret = await self._safely("reading the secret", rec.id, self.store.get_secret(rec.id))
        if not isinstance(secret, SessionSecret) or not rec.container_id:
            log.warning("session %.12s cannot be reattached here: no reconnect secret in the store", rec.id)
            return None
        try:
            keys = SessionKeys(
                client_key=asyncssh.import_private_key(secret.client_key),
                host_key=asyncssh.import_public_key(secret.host_key),
            )
        except (asyncssh.KeyImportError, ValueError) as exc:
            log.warning("session %.12s: stored keys do not import: %r", rec.id, exc)
            return None
        container = Container(rec.container_id, rec.container_name, rec.address, rec.port, rec.ssh_user)
        return Adoptable(rec, container, keys)

    async def claim(self, session_id: str, allowed: Callable[[SessionRecord], bool]) -> Adoptable | None:
        """Become the gateway serving `session_id`, if the store has it live and `allowed` (the
        ownership check) says yes. The lease may change under us (its gateway letting go as it
        stops, another window): then read it again."""
        for attempt in range(TAKE_ATTEMPTS):
            rec = await self.find(session_id)
            if rec is None or not allowed(rec):
                return None
            found = await self.load(rec)
            if found is None:
                return None
            if await self.take(rec):
                return found
            log.info("session %.12s: its lease changed while taking it (try %d)", session_id, attempt + 1)
            await asyncio.sleep(0.05 * (attempt + 1))
        return None

    async def take(self, rec: SessionRecord) -> bool:
        """Become the gateway attached to `rec` (compare-and-set on the lease as it was read):
        False when someone else changed it meanwhile."""
        won = await self._safely(
            "taking over",
            rec.id,
            self.store.update_session(
                rec.id, expect={"attached_by": rec.attached_by, "attached_at": rec.attached_at, "ended": False},
                attached_by=self.instance, attached_at=time.time(), gateway=self.instance,
            ),
        )
        return won is True

    async def end_unclaimed(self, rec: SessionRecord) -> bool:
        """End `rec` if nobody took it since it was read: exactly one replica wins this."""
        won = await self._safely(
            "ending",
            rec.id,
            self.store.update_session(
                rec.id, expect={"attached_by": rec.attached_by, "attached_at": rec.attached_at, "ended": False},
                ended=True,
            ),
        )
        return won is True

    async def write_activity(self, sessions: Iterable[Session]) -> None:
        """The idle clocks (wall clock, for the next gateway) and byte counts (for every
        gateway's console) that moved since last written."""
        for session in sessions:
            written = self._written_activity.get(session.id)
            now = _progress(session)
            if written is None or now == written or session.ending:
                continue
            self._written_activity[session.id] = now
            await self._safely(
                "writing activity",
                session.id,
                self.store.update_session(session.id, last_activity=wall_from_monotonic(session.last_activity),
                                          bytes_in=session.bytes_in, bytes_out=session.bytes_out),
            )

    async def taken_from_us(self, sessions: Iterable[Session]) -> list[Session]:
        """Sessions this gateway serves whose lease another gateway took (another window
        attached there): this gateway must let them go."""
        mine = {s.id: s for s in sessions if s.door == "web" and s.id in self._written_activity and not s.ending}
        if not mine:
            return []
        records = await self._safely("checking leases", "*", self.store.list_sessions())
        if not isinstance(records, list):
            return []
        return [mine[r.id] for r in records if r.id in mine and r.attached_by not in (None, self.instance)]


Remove = Callable[[str, str, str], Awaitable[None]]  # (session id, container id, why): container, then record


async def recover(
    continuity: Continuity,
    alive: Callable[[str], Awaitable[bool | None]],
    remove: Remove,
    adopted: Callable[[str], bool],
) -> list[asyncio.Task]:
    """At gateway start: keep the web sessions whose containers live (their pages come back to
    any gateway), forget records whose container is gone, end this instance's SSH-door sessions
    (their connections died with the previous process). A kept session nobody reattaches within
    `reconnect_grace` ends as `disconnected`; the returned tasks wait for that."""
    store, me = continuity.store, continuity.instance
    try:
        records = await store.list_sessions()
    except BridgeError as exc:
        log.warning("store: cannot list sessions at start (%s); none adopted", exc.detail)
        return []
    waits: list[asyncio.Task] = []
    for rec in records:
        if rec.ended:
            await _drop(continuity, rec, remove, "ended")
            continue
        running = await alive(rec.container_id) if rec.container_id else False
        if running is None:
            continue  # Docker cannot say: leave it to the next gateway or reaper round
        if not running:
            log.info("session %.12s of %s: container gone; record forgotten", rec.id, rec.user)
            await continuity.forget(rec.id)
            continue
        if rec.door != "web":
            if rec.gateway == me:
                await _drop(continuity, rec, remove, "SSH-door session of the previous run")
            continue
        if rec.attached_by == me:  # the previous run of this gateway died without letting go
            await continuity.release(rec.id)
            rec = await continuity.find(rec.id) or rec
        if rec.attached_by is None:
            log.info("session %.12s of %s kept; waiting %.0f s for its page", rec.id, rec.user, continuity.config.reconnect_grace)
            waits.append(asyncio.create_task(_grace(continuity, rec, remove, adopted), name=f"grace-{rec.id[:8]}"))
    return waits


async def _drop(continuity: Continuity, rec: SessionRecord, remove: Remove, why: str) -> None:
    log.info("session %.12s of %s: %s; removing its container", rec.id, rec.user, why)
    if rec.container_id:
        await remove(rec.id, rec.container_id, f"session {rec.id[:12]} ({why})")
    else:
        await continuity.forget(rec.id)


async def _grace(
    continuity: Continuity,
    rec: SessionRecord,
    remove: Remove,
    adopted: Callable[[str], bool],
) -> None:
    await asyncio.sleep(continuity.config.reconnect_grace)
    if adopted(rec.id):
        return
    if await continuity.end_unclaimed(rec):
        await _drop(continuity, rec, remove, "disconnected: nobody came back after the restart")
