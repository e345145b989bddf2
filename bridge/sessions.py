"""The session manager: limits, the registry, activity, idle and lifetime timers, and removal.

A session (`session.py`) is one container, one upstream SSH connection and, for the web door, one
shell whose output flows through a `Stream`. Front doors hand the manager an authenticated user
and a `Sink` (where control events go); the web door opens or resumes its terminals with the one
call `open_terminal`, which also adopts a session another gateway process started. The pure
clocks live in `timers.py`, the reaper and fleet-wide view in `fleet.py`, records and reconnect
secrets in `continuity.py`.

Why this module is longer than the others (under 900 lines): start, adoption, the timers, every
end and every removal change the same registry and the same per-user holds against the caps,
and each must leave both exact on every path (exit, error, cancel, shutdown, let go at a
restart). Kept together, that invariant is read and tested in one place (tests/test_session_core.py).
Who is attached (the takeover across doors) changes the same sessions and is kept beside it;
admins watching or joined are `viewing.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from functools import partial
from typing import Any, cast

from .auth import AuthenticatedUser
from .backends.base import Backend, Container, ContainerSpec
from .config import DEFAULT_PROFILE, Config, ProfileConfig, SessionConfig
from .continuity import (
    ACTIVITY_WRITE_INTERVAL, LEASE_CHECK_INTERVAL, Adoptable, Continuity, monotonic_from_wall, wall_from_monotonic,
)
from .errors import BridgeError, LimitReached, SessionStartError, StoreUnavailable
from .fleet import FLEET_INTERVAL, HOST_INTERVAL, FleetKeeper
from .homes import HomeMounts, HomeStore
from .observers import Observers
from .pool import Pooled, WarmPools, pool_slot
from .session import Session, Sink, TerminalRequest, TerminalSink
from .store import Refusal, SessionRecord, Store
from .stream import Stream
from .timers import IdleAction, describe_end, idle_step
from .upstream import SessionKeys, Upstream
from .viewing import Viewing
from .vocab import Actor, Door, EndReason, LoginResult

log = logging.getLogger("termbridge.sessions")



def limit_reached(cap: Refusal, max_per_user: int, max_total: int, profile: str = DEFAULT_PROFILE) -> LimitReached:
    """The refusal of a cap, in words for the person and for the log (max_per_user is the
    session's profile's: named as its key)."""
    if cap == "max_total":
        return LimitReached(
            f"this server is at its limit of {max_total} sessions (session.max_total); try again later",
            detail=f"refused: session.max_total={max_total} reached",
        )
    key = "session.max_per_user" if profile == DEFAULT_PROFILE else f"profiles.{profile}.max_per_user"
    return LimitReached(
        f"you already have {max_per_user} sessions, the most allowed ({key}); end one first",
        detail=f"refused: {key}={max_per_user} reached",
    )


def started_and_idle(entry: Session | SessionRecord) -> tuple[datetime, float]:
    """When a live session (here, or as the store lists it) started, and how long it has been idle."""
    if isinstance(entry, Session):
        return entry.started_at, time.monotonic() - entry.last_activity
    return datetime.fromtimestamp(entry.started, timezone.utc), time.time() - entry.last_activity


# How the manager reaches a started container's sshd: `Upstream.connect`; unit tests pass a fake.
Connect = Callable[[Container, SessionKeys, float], Awaitable[Upstream]]


class SessionManager:
    def __init__(
        self, config: Config, backend: Backend, store: Store | None = None, gateway: str = "",
        connect: Connect = Upstream.connect,
    ) -> None:
        """With `store`, the caps hold across every gateway sharing it (slots), sessions are
        recorded there for `termbridge sessions` on any gateway, the reaper goes by it, and web
        sessions outlive this process (`continuity`)."""
        self.config = config
        self.backend = backend
        self.store = store
        self.gateway = gateway
        self._connect = connect
        # Reconnect secrets and the attach lease in the store (None: sessions end with this process).
        self.continuity = Continuity(store, gateway, config.session) if store is not None else None
        self.sessions: dict[str, Session] = {}
        self._cleanups: set[asyncio.Task] = set()
        # Backend starts in flight (threads), by session id; a cancelled one stays until its
        # container, if it landed, is removed.
        self._starting: dict[str, asyncio.Future[Container]] = {}
        # What each user holds against the caps: one per session from its first step until Docker
        # confirmed its container gone (or its start failed leaving nothing), so that starts
        # abandoned at once cannot pile up containers, nor Docker calls that others wait for.
        self._held: Counter[str] = Counter()
        self._holders: dict[str, str] = {}  # session id -> user, while it holds
        self._closing = False
        self.observers = Observers()
        self.viewing = Viewing(self.observers)
        self.keeper = FleetKeeper(self)
        self.pool = WarmPools(config.all_profiles(), backend, self._room, store) or None
        self.homes = HomeMounts(HomeStore(config.homes_path, config.session.uid_base), self._slot_elsewhere)

    def _room(self) -> int:
        """How many more containers this gateway may hold (sessions and pooled ones alike)."""
        return self.config.session.max_total - len(self._holders) - (self.pool.held if self.pool else 0)

    def note_login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str = "") -> None:
        """Every door reports each login attempt here (never the password), whatever its outcome,
        so that the audit trail and the metrics see all doors alike."""
        self.observers.login(user, rhost, Door(door), LoginResult(result), reason)

    # -- limits -------------------------------------------------------------------------------

    def count_for(self, username: str) -> int:
        """Containers `username` holds: live sessions, starts and removals not yet done."""
        return self._held[username]

    def _hold(self, session: Session) -> None:
        self._held[session.user.name] += 1
        self._holders[session.id] = session.user.name

    def _release(self, session_id: str) -> None:
        """The session's container is gone (or never came): its slot is free, and its home may
        be unmounted. Idempotent."""
        username = self._holders.get(session_id, "")
        if self._unhold(session_id):
            self._track(self._released(session_id, username))

    async def _released(self, session_id: str, username: str) -> None:
        if self.store is not None:
            await self.forget(session_id)
        await self.homes.release(session_id, username)

    async def _slot_elsewhere(self, username: str) -> bool:
        """Whether the store holds a slot of `username`'s (another gateway on this host may use
        their home); a store that does not answer counts as yes: a home left mounted is harmless."""
        if self.store is None:
            return False
        try:
            slots = await self.store.list_slots()
        except StoreUnavailable as exc:
            log.warning("home of %s stays mounted: the store did not answer: %s", username, exc.detail)
            return True
        return any(slot.user == username for slot in slots.values())

    def _unhold(self, session_id: str) -> bool:
        """This gateway no longer counts the session (it ended, or runs on without this
        gateway: its slot in the store stays then). False if it did not count it."""
        username = self._holders.pop(session_id, None)
        if username is None:
            return False
        self._held[username] -= 1
        if self._held[username] <= 0:
            del self._held[username]
        if self.pool is not None:
            self.pool.kick()  # a slot is free: the pool may refill up to max_total
        return True

    def settings(self, session: Session) -> SessionConfig:
        """The session settings a session runs with: its profile's (else [session])."""
        return session.settings or self.config.session

    def _check_limits(self, user: AuthenticatedUser, profile: ProfileConfig) -> None:
        """max_per_user is the profile's (counting every session of the user, whatever its
        profile); max_total is the gateway's."""
        cfg = profile.session
        if self._closing:
            raise LimitReached("the gateway is shutting down", detail="refused: shutting down")
        # A login that takes a pooled container adds nothing to what the gateway holds.
        takes_pooled = self.pool is not None and self.pool.ready_for(profile.name)
        if self._room() + takes_pooled <= 0:
            raise limit_reached("max_total", cfg.max_per_user, cfg.max_total)
        if self.count_for(user.name) >= cfg.max_per_user:
            raise limit_reached("max_per_user", cfg.max_per_user, cfg.max_total, profile.name)

    async def _reserve(self, session_id: str, user: str, pooled: Pooled | None, profile: ProfileConfig) -> None:
        """Take the session's slot in the store, so the caps hold across the fleet. Raises
        LimitReached (a cap refused) or StoreUnavailable."""
        if self.store is None:
            return
        cfg = profile.session
        if pooled is not None:
            refusal = await self.store.claim_slot(
                pool_slot(pooled.session_id), session_id, user, cfg.max_per_user, cfg.max_total
            )
        else:
            refusal = await self.store.reserve_slot(session_id, user, cfg.max_per_user, cfg.max_total)
        if refusal is not None:
            raise limit_reached(refusal, cfg.max_per_user, cfg.max_total, profile.name)

    # -- life cycle ---------------------------------------------------------------------------

    async def create(
        self, user: AuthenticatedUser, door: Door, sink: Sink, terminal: TerminalRequest | None = None,
        profile: ProfileConfig | None = None,
    ) -> Session:
        """Start a session of `profile` (the door checked that it is the person's; default: the
        default profile) and attach `sink`. With `terminal`, a login shell on a pty is opened and
        its output pumped to the sink; without, the session is the container and its upstream
        connection only, and the door opens its own channels on `session.upstream`.

        Returns once ready and `sink.started` was called; raises a BridgeError (limit, Docker
        down, image missing, start failure) with nothing left behind. Cancelling the caller also
        leaves nothing behind."""
        door = Door(door)
        profile = profile or self.config.default_profile
        try:
            self._check_limits(user, profile)
        except LimitReached as exc:
            self.observers.session_refused(user, door, exc.detail, profile.name)
            raise
        pooled = self.pool.take(profile.name) if self.pool is not None else None
        session = Session(
            user, door, sink, pooled.session_id if pooled else None, profile.session.max_lifetime,
            profile=profile.name, settings=profile.session,
        )
        self.sessions[session.id] = session
        self._hold(session)
        try:
            await self._reserve(session.id, user.name, pooled, profile)
        except (LimitReached, StoreUnavailable, asyncio.CancelledError) as exc:
            self.sessions.pop(session.id, None)
            self._release(session.id)
            if pooled is not None and self.pool is not None:
                self.pool.give_back(pooled)
            if isinstance(exc, LimitReached):
                self.observers.session_refused(user, door, exc.detail, profile.name)
            elif isinstance(exc, StoreUnavailable):
                session.log.error("refused: the state store did not answer: %s", exc.detail)
            raise
        session.log.info(
            "starting (%s door, profile %s%s)", door, profile.name, f", pooled {pooled.container.name}" if pooled else ""
        )
        try:
            await self._provision(session, terminal, pooled)
        except asyncio.CancelledError:
            self._finish(session, EndReason.CANCELLED)
            raise
        except BridgeError as exc:
            session.log.error("start failed: %s", exc.detail)
            self._finish(session, EndReason.ERROR, exc.detail)
            raise
        except Exception as exc:
            session.log.exception("start failed")
            self._finish(session, EndReason.ERROR, repr(exc))
            raise SessionStartError(detail=repr(exc)) from exc
        if session.ready_at is None:
            raise RuntimeError("a started session without ready_at")
        session.log.info(
            "ready in %.0f ms: container %s",
            (session.ready_at - session.created) * 1000,
            session.container and session.container.name,
        )
        return session

    async def _provision(self, session: Session, terminal: TerminalRequest | None, pooled: Pooled | None) -> None:
        cfg = self.settings(session)
        if pooled is not None:
            keys = pooled.keys
            session.container = pooled.container  # removed with the session, whatever happens next
            session.container = await self.backend.claim(
                pooled.container, session.user.name, session.user.uid, cfg.user == "root"
            )
        else:
            keys = SessionKeys.generate()
            session.container = await self._start_container(session, keys)
        session.keys = keys
        self._check_not_ended(session)
        async with asyncio.timeout(cfg.start_timeout):
            session.upstream = await self._connect(session.container, keys, cfg.start_timeout)
            if terminal is not None:
                await self._open_stream(session, session.upstream, terminal)
        self._check_not_ended(session)
        await self._record(session)
        session.ready_at = time.monotonic()
        session.touch()
        if self.continuity is not None:
            await self.continuity.started(session)
        self.observers.session_started(session, session.ready_at - session.created)
        await self._run(session)

    async def _open_stream(self, session: Session, upstream: Upstream, terminal: TerminalRequest, offset: int = 0) -> None:
        """The session's shell (through the holder, from output `offset` on; a full-screen
        program is repainted for a page that comes back) and its stream."""
        shell = await upstream.attach_held(
            terminal.term, terminal.cols, terminal.rows, offset, terminal.env, repaint=offset > 0
        )
        if shell.lost:
            session.log.info("the holder no longer has %d bytes from offset %d", shell.lost, offset)
        session.stream = Stream(
            shell,
            session.log,
            name=session.id[:8],
            note_output=session.note_output,
            grace=self.config.session.reconnect_grace,
            abandoned=partial(self._abandoned, session),
            dropped=partial(self.detach, session),
            start=shell.offset,
        )
        session.term_size = (terminal.cols, terminal.rows)

    async def _run(self, session: Session) -> None:
        """The session is ready (started or adopted): tell its sink, start its clocks and pump."""
        if session.sink is not None:
            await session.sink.started(session)
        session._tasks.append(asyncio.create_task(self._watchdog(session), name=f"watchdog-{session.id[:8]}"))
        if session.stream is not None:
            session._tasks.append(asyncio.create_task(self._pump(session), name=f"pump-{session.id[:8]}"))

    async def _record(self, session: Session) -> None:
        """The session in the store: every gateway of the fleet lists it, and leaves its container alone."""
        if self.store is None or session.container is None:
            return
        now, container = time.time(), session.container
        await self.store.put_session(
            SessionRecord(
                id=session.id, user=session.user.name, door=str(session.door), gateway=self.gateway, started=now,
                last_activity=now, lifetime_deadline=wall_from_monotonic(session.lifetime_end), profile=session.profile,
                container_id=container.id, container_name=container.name, address=container.address,
                port=container.port, ssh_user=container.ssh_user, attached_by=self.gateway, attached_at=now,
            )
        )

    @staticmethod
    def _check_not_ended(session: Session) -> None:
        """A session killed (logout, shutdown) or let go while it started must not go on to run."""
        if session.ending:
            raise SessionStartError(detail=f"ended ({session.end_reason or 'let go'}) while starting")

    async def _mount_home(self, session: Session) -> str:
        """The person's persistent home, mounted on the host (made on first use): the directory
        the container gets; "" when homes are ephemeral."""
        cfg = self.settings(session)
        if cfg.home != "persistent":
            return ""
        return await self.homes.mount(session.id, session.user.name, session.user.uid, cfg.home_size)

    async def _start_container(self, session: Session, keys: SessionKeys) -> Container:
        home = await self._mount_home(session)  # on failure, _finish releases the slot and the home
        spec = ContainerSpec(
            session_id=session.id,
            user=session.user.name,
            door=session.door,
            started=session.started_at.isoformat(timespec="seconds"),
            authorized_keys=keys.authorized_keys,
            host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key,
            root=self.settings(session).user == "root",
            uid=session.user.uid,
            profile=session.profile,
            settings=self.settings(session),
            home=home,
        )
        start = asyncio.ensure_future(self.backend.start(spec))
        self._starting[session.id] = start
        try:
            container = await asyncio.shield(start)
        except asyncio.CancelledError:
            # The thread may still create the container: remove it when it lands, in a task that
            # close() waits for (a callback would fire after shutdown and leak it). The session
            # holds its slot until then.
            self._track(self._remove_when_started(session.id, start))
            raise
        except BaseException:
            self._starting.pop(session.id, None)
            self._release(session.id)  # the backend leaves nothing behind when a start fails
            raise
        self._starting.pop(session.id, None)
        return container

    async def _remove_when_started(self, session_id: str, start: asyncio.Future[Container]) -> None:
        try:
            container = await start
        except Exception:
            return  # the backend leaves nothing behind when a start fails
        else:
            await self._remove(container.id, "cancelled start")
        finally:
            self._starting.pop(session_id, None)
            self._release(session_id)

    # -- web terminals: one call opens or resumes, the stream does the rest -----------------------

    async def open_terminal(
        self,
        user: AuthenticatedUser,
        door: Door,
        sink: TerminalSink,
        terminal: TerminalRequest,
        resume: tuple[str, int] | None = None,
        profile: ProfileConfig | None = None,
    ) -> Session:
        """Open a terminal for `user` and attach `sink` to it: resume `user`'s own live session
        named by `resume` = (session id, output offset), replaying from that offset (it keeps its
        own profile), or start a new one of `profile` (also when `resume` names no such session).
        `sink.started` and then `sink.attached` are called before this returns. Raises what
        `create` raises."""
        session = self._resumable(user, resume[0]) if resume is not None else None
        offset = 0
        if session is None and resume is not None and self.continuity is not None:
            session = await self._adopt(user, door, sink, terminal, *resume)
            offset = resume[1]
        elif session is not None:
            offset = resume[1] if resume is not None else 0
            await sink.started(session)
        if session is None:
            session = await self.create(user, door, sink, terminal, profile)
        stream = session.stream
        if stream is None or session.ending:
            raise SessionStartError("this session cannot be attached", detail="ended before it was attached")
        session.sink = sink
        await stream.attach(sink, offset)
        self._follow_size(session, terminal)
        if session.viewers:
            await self.viewing.tell_owner(session)
        return session

    @staticmethod
    def _follow_size(session: Session, terminal: TerminalRequest) -> None:
        """The window attached last is the active client: the shell takes its size (a page that
        takes its session back from `ssh ... attach`, or from another window)."""
        if session.term_size != (terminal.cols, terminal.rows):
            session.resize(terminal.cols, terminal.rows)

    async def open_shell(self, session: Session, sink: TerminalSink, terminal: TerminalRequest) -> None:
        """The interactive shell of a session started without one (the SSH door's first pty
        shell), through the holder like a web terminal's, so that the other door can attach to
        it and admins can watch it; `sink` is attached to it. The session's own sink (the SSH
        connection) still hears idle warnings and the end. Raises SessionStartError."""
        if session.upstream is None or session.stream is not None or session.ending:
            raise SessionStartError("this session cannot open a shell", detail="open_shell: no upstream, or a stream")
        try:
            async with asyncio.timeout(self.config.session.start_timeout):
                await self._open_stream(session, session.upstream, terminal)
        except TimeoutError:
            raise SessionStartError(detail="the holder did not answer within session.start_timeout") from None
        if session.stream is None:
            raise RuntimeError("a stream that did not open")
        session._tasks.append(asyncio.create_task(self._pump(session), name=f"pump-{session.id[:8]}"))
        await session.stream.attach(sink, 0)

    async def attach_own(
        self, user: AuthenticatedUser, session_id: str, sink: TerminalSink, terminal: TerminalRequest
    ) -> Session:
        """Attach `sink` (another door of the owner: `ssh ... attach ID`) to `user`'s own live
        terminal session, here or (through the store) on another gateway. The existing takeover
        rule holds: the window attached so far is told and let go; the session's size becomes
        `terminal`'s (the last attached is the active client). The whole buffer is replayed,
        and a full-screen program asked to repaint. Raises SessionStartError when there is no such session."""
        session = self._resumable(user, session_id)
        if session is not None:
            await sink.started(session)
        elif self.continuity is not None:
            session = await self._adopt(user, Door.WEB, sink, terminal, session_id, 0)
        if session is None or session.stream is None or session.ending:
            raise SessionStartError(
                "you have no live session with that id", detail=f"attach to {session_id[:12]}: no such live session"
            )
        session.sink = sink
        await session.stream.attach(sink, 0)
        self._follow_size(session, terminal)
        self.viewing.repaint(session)
        if session.viewers:
            await self.viewing.tell_owner(session)
        return session

    async def own_terminals(self, user: AuthenticatedUser) -> list[SessionRecord | Session]:
        """`user`'s live terminal sessions: this gateway's (either door: an SSH-door session once
        its shell runs), and the web sessions the store lists that no process serves here (on
        other gateways, or waiting for this one after a restart)."""
        here: list[SessionRecord | Session] = [s for s in self.sessions.values() if s.user.name == user.name and s.ready]
        seen = {s.id for s in here}
        if self.store is not None:
            try:
                records = await self.fleet()
            except StoreUnavailable as exc:
                log.warning("listing the sessions of %s: %s", user.name, exc.detail)
                records = []
            # not one this gateway holds (starting here, or ending)
            here += [r for r in records
                     if r.user == user.name and r.door == Door.WEB and r.id not in seen and r.id not in self._holders]
        return here

    def find_own(self, session_id: str, user: AuthenticatedUser, purpose: str, rhost: str = "-") -> Session | None:
        """The session `session_id` if it belongs to `user`. Anyone else's is reported as unknown
        (and logged), so session ids cannot be probed from another account."""
        session = self.sessions.get(session_id[:64]) if session_id else None
        if session is not None and not self._owns(user, session_id, session.user.name, purpose, rhost):
            return None
        return session

    @staticmethod
    def _owns(user: AuthenticatedUser, session_id: str, owner: str, purpose: str, rhost: str) -> bool:
        """The one ownership check, for sessions in memory and in the store alike."""
        if owner == user.name:
            return True
        log.warning(
            "%s of %s from %s for session %.12s refused: it belongs to %s", purpose, user.name, rhost, session_id, owner
        )
        return False

    async def _adopt(
        self, user: AuthenticatedUser, door: Door, sink: TerminalSink, terminal: TerminalRequest, session_id: str,
        offset: int,
    ) -> Session | None:
        """Serve `user`'s web session that another gateway process started (this one before a
        restart, or a sibling replica): reconnect to its container with the stored keys and
        attach to its shell from `offset`. None when the store has no such live session."""
        continuity = self.continuity
        if continuity is None:
            return None
        found = await continuity.claim(
            session_id[:64], lambda rec: self._owns(user, session_id, rec.user, "reattach", "-") and rec.door == door
        )
        if found is None:
            log.info("reattach of %s to %.12s: not in the store; starting a new one", user.name, session_id)
            return None
        rec = found.record
        profile = self.config.profile(rec.profile)
        if profile is None:
            log.warning("session %.12s: its profile %r is no longer configured; [session]'s clocks apply",
                        rec.id, rec.profile)
        session = Session(user, door, sink, rec.id, profile=rec.profile, settings=profile.session if profile else None)
        session.adopted = True
        if self.settings(session).home == "persistent":
            self.homes.note(session.id, user.uid)  # its container may have the home: unmount after it
        session.log.info("adopting (started by gateway %s, attached to %s)", rec.gateway, rec.attached_by or "none")
        self.sessions[session.id] = session
        self._hold(session)  # it counts against this gateway's caps while served here
        try:
            await self._reconnect(session, found, terminal, offset)
            self._check_not_ended(session)
        except (BridgeError, OSError, TimeoutError) as exc:
            detail = getattr(exc, "detail", None) or repr(exc)
            session.log.warning("adoption failed: %s", detail)
            self.sessions.pop(session.id, None)
            self._unhold(session.id)
            self.homes.forget(session.id)
            if session.upstream is not None:
                session.upstream.close()
            if session.released:  # the gateway stops: the page was told to come back
                raise SessionStartError(detail="let go while adopting") from None
            await self._forget_if_gone(continuity, rec)
            return None
        continuity.note_adopted(session)
        session.log.info("adopted in %.0f ms", (time.monotonic() - session.created) * 1000)
        await self._run(session)
        return session

    async def _reconnect(self, session: Session, found: Adoptable, terminal: TerminalRequest, offset: int) -> None:
        rec = found.record
        session.started_at = datetime.fromtimestamp(rec.started, timezone.utc)
        session.container, session.keys = found.container, found.keys
        timeout = self.settings(session).start_timeout
        async with asyncio.timeout(timeout):
            session.upstream = upstream = await self._connect(found.container, found.keys, timeout)
            await self._open_stream(session, upstream, terminal, offset)
        # The clocks go on from where the store has them.
        session.ready_at = time.monotonic()
        session.lifetime_end = monotonic_from_wall(rec.lifetime_deadline)
        session.last_activity = monotonic_from_wall(rec.last_activity)

    async def _forget_if_gone(self, continuity: Continuity, rec: SessionRecord) -> None:
        try:
            state = await self.backend.poll(rec.container_id)
        except BridgeError:
            return
        if not state.running:
            await continuity.forget(rec.id)

    def _resumable(self, user: AuthenticatedUser, session_id: str) -> Session | None:
        """`user`'s own live terminal session `session_id`, from either door (one session, both doors)."""
        session = self.find_own(session_id, user, "reattach")
        if session is None or not session.ready:
            log.info("reattach of %s to %.12s: no such live session; starting a new one", user.name, session_id)
            return None
        return session

    def detach(self, session: Session, sink: TerminalSink) -> None:
        """`sink`'s front door went away: keep the session for `session.reconnect_grace`.
        A no-op when another sink has taken over, or the grace already runs."""
        stream = session.stream
        if session.ending or stream is None:
            return
        if stream.attachment is not None and stream.attachment.sink is sink:
            session.sink = None
        stream.detach(sink)

    async def _abandoned(self, session: Session) -> None:
        if not session.ending:
            await self.end(session, EndReason.DISCONNECTED)

    async def _pump(self, session: Session) -> None:
        """The shell's output into its stream until the shell exits; then the session ends."""
        if session.stream is None:
            raise RuntimeError("a started session without a stream")
        try:
            await session.stream.pump()
            status, signal = await session.stream.shell.wait_exit()
            if status is not None:
                await self.end(session, EndReason.EXIT, code=status)
                return
            if signal:
                session.exit_signal = signal
                await self.end(session, EndReason.EXIT, code=None, message=f"the shell was killed by signal {signal}")
                return
            await self._end_lost(session, "the shell ended without an exit status")
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            await self._end_lost(session, repr(exc))

    async def _end_lost(self, session: Session, detail: str) -> None:
        """The upstream went away without an exit status: ask Docker what happened."""
        message = "the connection to your container was lost"
        if session.container is not None:
            # The connection often drops a moment before Docker records the container's end.
            for _ in range(10):
                try:
                    state = await self.backend.poll(session.container.id)
                except BridgeError as exc:
                    detail += f"; Docker: {exc.detail}"
                    break
                described = describe_end(state, self.settings(session).memory)
                if described:
                    message = described
                    break
                await asyncio.sleep(0.2)
        session.log.warning("upstream lost: %s (%s)", detail, message)
        await self.end(session, EndReason.ERROR, message=message)

    async def _watchdog(self, session: Session) -> None:
        cfg = self.settings(session)
        lifetime_end = session.lifetime_end
        while not session.ending:
            now = time.monotonic()
            if now >= lifetime_end:
                await self.end(session, EndReason.LIFETIME, message="the session reached its maximum lifetime")
                return
            action, delay = idle_step(session.last_activity, now, cfg.idle_timeout, session.warned)
            if action is IdleAction.END:
                await self.end(session, EndReason.IDLE, message="the session was idle for too long")
                return
            if action is IdleAction.WARN:
                session.warned = True
                session.log.info("idle warning: %.0f s left", delay)
                if session.sink is not None:
                    try:
                        await session.sink.idle_warning(delay)
                    except (ConnectionError, RuntimeError):
                        pass
                continue
            await asyncio.sleep(max(0.05, min(delay, lifetime_end - now)))

    async def end(self, session: Session, reason: EndReason, code: int | None = None, message: str | None = None) -> None:
        """End a session for `reason` (exit, idle, lifetime, killed, error, disconnected).
        Idempotent; tells the attached front door, then removes the container."""
        if session.ending:
            await session.wait_ended()
            return
        session.end_reason, session.exit_code = reason, code
        current = asyncio.current_task()
        for task in session._tasks:
            if task is not current:
                task.cancel()
        if session.stream is not None:
            await session.stream.close()
        sink, session.sink = session.sink, None
        if sink is not None and reason is not EndReason.DISCONNECTED:
            try:
                async with asyncio.timeout(5):
                    await sink.ended(code, reason, message)
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                session.log.info("could not tell the front door about the end: %r", exc)
        self._finish(session, reason)

    def _finish(self, session: Session, reason: EndReason, detail: str = "") -> None:
        """Release everything the session holds; the container's removal runs in a task the
        manager owns, so a cancelled caller cannot skip it."""
        session.end_reason = session.end_reason or reason
        for tap in session.taps:
            tap.close()
        session.taps.clear()
        if session.upstream is not None:
            session.upstream.close()
        if session.container is not None and not session.removal_scheduled:
            session.removal_scheduled = True
            self._schedule_removal(session.container.id, f"session {session.id[:12]}", session.id)
        elif session.container is None and session.id not in self._starting:
            self._release(session.id)  # no container, none on its way
        self.sessions.pop(session.id, None)
        if session._ended.is_set():
            return  # killed while starting, finished again once its container landed
        lived = time.monotonic() - session.ready_at if session.ready_at else 0.0
        session.log.info(
            "ended: reason=%s code=%s after %.1f s, %d bytes in, %d bytes out",
            session.end_reason,
            session.exit_code,
            lived,
            session.bytes_in,
            session.bytes_out,
        )
        if session.ready_at is None:
            self.observers.session_failed(session, detail or session.end_reason)
        else:
            self.observers.session_ended(session)
        session._ended.set()

    async def remove_container(self, session_id: str, container_id: str, why: str) -> None:
        """Remove the container of a session no gateway serves (one a previous run left) and then
        its record, in a task that `close()` waits for."""
        self._track(self._remove(container_id, why, forget=session_id))

    def _schedule_removal(self, container_id: str, why: str, holder: str) -> None:
        self._track(self._remove(container_id, why, holder))

    def _track(self, cleanup: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _remove(
        self, container_id: str, why: str, holder: str | None = None, forget: str | None = None
    ) -> None:
        """Remove a container; then `holder`'s slot (a session id) is free, and (`forget`: a
        session id) the session's store entry goes."""
        try:
            for attempt in range(3):
                try:
                    await self.backend.stop(container_id)
                    log.debug("removed container %s (%s)", container_id[:12], why)
                    if forget is not None:
                        await self.forget(forget)
                    return
                except BridgeError as exc:
                    log.warning("removing container %s failed (try %d): %s", container_id[:12], attempt + 1, exc.detail)
                    await asyncio.sleep(1 + attempt)
            log.error("container %s not removed; the reaper will retry", container_id[:12])
        finally:
            if holder is not None:
                self._release(holder)

    async def forget(self, session_id: str) -> None:
        """Drop the session's record and slot from the store (the reaper retries if it is down)."""
        if self.store is None:
            return
        try:
            await self.store.delete_session(session_id)
        except StoreUnavailable as exc:
            log.warning("session %.12s: not forgotten in the store (the reaper will retry): %s", session_id, exc.detail)

    # -- the fleet: reaper, fleet-wide view, kills across gateways (fleet.py) -------------------

    async def reap(self) -> int:
        """Remove containers that nothing owns; with a store, fleet-wide."""
        return await self.keeper.reap()

    async def watch_fleet(self, interval: float = FLEET_INTERVAL) -> None:
        await self.keeper.watch_fleet(interval)

    async def watch_hosts(self, interval: float = HOST_INTERVAL) -> None:
        await self.keeper.watch_hosts(interval)

    async def fleet(self) -> list[SessionRecord]:
        """Every session of every gateway sharing the store (none without a store)."""
        return await self.keeper.fleet()

    async def fleet_view(self) -> list[dict[str, Any]]:
        """Every live session of the fleet, described (`FleetKeeper.view`), oldest first."""
        return await self.keeper.view()

    async def request_kill(self, record: SessionRecord, wait: float = 5.0) -> None:
        await self.keeper.request_kill(record, wait)

    async def end_session(self, session_id: str, by: str = "an administrator") -> bool:
        """End a live session of any gateway of the fleet (`FleetKeeper.end_session`)."""
        return await self.keeper.end_session(session_id, by)

    async def release(self, session: Session, restarting: bool) -> None:
        """Let go of a web session without ending it: its shell runs on in its container (the
        holder keeps it and its output) for the next gateway to adopt. The attached page is told
        the gateway is `restarting` (come back) or that another window took it over."""
        if session.ending:
            return
        session.released = True
        current = asyncio.current_task()
        for task in session._tasks:
            if task is not current:
                task.cancel()
        stream, sink, session.sink = session.stream, session.sink, None
        if stream is not None:
            await stream.close()
        if sink is not None:
            try:
                async with asyncio.timeout(2):
                    if restarting:
                        await cast(TerminalSink, sink).restarting()
                    else:
                        await cast(TerminalSink, sink).superseded()
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                session.log.info("could not tell the front door: %r", exc)
        if session.upstream is not None:
            session.upstream.close()
        self.sessions.pop(session.id, None)
        self._unhold(session.id)
        self.homes.forget(session.id)  # its container keeps the home; whoever serves it next unmounts
        if restarting and self.continuity is not None:
            await self.continuity.release(session.id)
        session.log.info("let go (%s); it runs on in container %s",
                         "gateway restarting" if restarting else "taken over by another gateway",
                         session.container and session.container.name)
        session._ended.set()

    async def watch_store(self, continuity: Continuity) -> None:
        """Forever: write moved idle clocks to the store, and let go of sessions another gateway
        took over (another window attached there)."""
        since_activity = 0.0
        while True:
            await asyncio.sleep(LEASE_CHECK_INTERVAL)
            for session in await continuity.taken_from_us(self.sessions.values()):
                session.log.info("another gateway took this session over")
                await self.release(session, restarting=False)
            since_activity += LEASE_CHECK_INTERVAL
            if since_activity >= ACTIVITY_WRITE_INTERVAL:
                since_activity = 0.0
                await continuity.write_activity(list(self.sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def removing(self, session_id: str) -> bool:
        """The session ended here and its container's removal is under way (its record, gone
        after that, no longer names a live session)."""
        return session_id in self._holders and session_id not in self.sessions

    def list(self) -> list[Session]:
        return list(self.sessions.values())

    async def kill(
        self, session: Session, message: str = "an administrator ended this session", actor: Actor = Actor.ADMIN
    ) -> None:
        """End a session from outside; `actor` (admin, logout, shutdown) goes to the audit trail."""
        if not session.ending:
            self.observers.session_killed(session, actor)
        await self.end(session, EndReason.KILLED, message=message)

    async def close(self, message: str = "the gateway is shutting down", keep: bool = False) -> None:
        """End every session (reason `killed`) and wait for every container's removal. With
        `keep`, web sessions are let go instead (`release`): they run on for the next gateway."""
        self._closing = True
        if self.pool is not None:
            await self.pool.close()
        sessions = list(self.sessions.values())
        kept = [
            s for s in sessions
            if keep and self.continuity is not None and s.door == Door.WEB and (s.ready or s.adopted) and not s.ending
        ]
        await asyncio.gather(
            *(self.release(s, restarting=True) for s in kept),
            *(self.kill(s, message, actor=Actor.SHUTDOWN) for s in sessions if s not in kept),
            return_exceptions=True,
        )
        # Containers still being created land after this; their sessions then remove them.
        while self._starting or self._cleanups:
            await asyncio.gather(*list(self._starting.values()), *list(self._cleanups), return_exceptions=True)
            await asyncio.sleep(0)
