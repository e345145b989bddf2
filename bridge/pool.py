"""The warm pool: containers created, started and sshd-ready ahead of time, so that a login only
has to claim one. Each is used once (never returned, never reused); a taken one is replaced in
the background. Pooled containers carry the termbridge.* labels (door `pool`, no user yet),
count toward `session.max_total` (with a store, fleet-wide: each holds a slot with no user,
`pool_slot`, claimed by the login that takes it), and are reaped like the rest.

Each profile with `pool` > 0 has its own `WarmPool`, made with its image, limits and
termbridge.profile label; `WarmPools` holds them all behind one face for the manager.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from .backends.base import Backend, Container, ContainerSpec
from .config import ProfileConfig, SessionConfig
from .errors import BridgeError, LimitReached, SessionStartError, StoreUnavailable
from .store import Store
from .upstream import SessionKeys

log = logging.getLogger("termbridge.pool")

RETRY_AFTER_FAILURE = 5.0


def pool_slot(session_id: str) -> str:
    """The slot id of a pooled container, distinct from the session id it gets when claimed."""
    return f"pool-{session_id}"


@dataclass(frozen=True)
class Pooled:
    session_id: str  # the id its session will have (it is in the container's labels already)
    container: Container
    keys: SessionKeys
    ready_at: float
    profile: str = "default"


async def wait_for_sshd(container: Container, timeout: float) -> None:
    """Until the container's sshd answers with its banner (no login: there is no user yet)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while True:
        try:
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                reader, writer = await asyncio.open_connection(container.address, container.port)
                try:
                    banner = await reader.readline()
                finally:
                    writer.close()
            if banner.startswith(b"SSH-2.0-"):
                return
        except (OSError, TimeoutError):
            pass
        if loop.time() + delay >= deadline:
            raise SessionStartError(detail=f"pooled container {container.name}: sshd not ready in {timeout:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


class WarmPool:
    def __init__(
        self, size: int, backend: Backend, config: SessionConfig, room: Callable[[], int], store: Store | None = None,
        profile: str = "default",
    ) -> None:
        """`room()` says how many more containers the gateway may hold (max_total less what
        sessions and every pool hold already). `config`: the profile's session settings."""
        self.profile = profile
        self.size = size
        self.backend = backend
        self.config = config
        self.room = room
        self.store = store
        self.ready: deque[Pooled] = deque()
        self.filling = 0
        self._making: set[str] = set()  # session ids of containers being made (for the reaper)
        self._refill: asyncio.Task | None = None
        self._closed = False
        self._closing = asyncio.Event()

    @property
    def held(self) -> int:
        """Containers this pool holds or is making."""
        return len(self.ready) + self.filling

    def ids(self) -> set[str]:
        """Session and container ids the reaper must leave alone."""
        return {p.session_id for p in self.ready} | {p.container.id for p in self.ready} | self._making

    def take(self) -> Pooled | None:
        """A ready container, brand-new and never used, or None. Starts the refill."""
        pooled = self.ready.popleft() if self.ready else None
        self.kick()
        return pooled

    def give_back(self, pooled: Pooled) -> None:
        """A taken container its login could not use (a cap refused it): still brand-new."""
        self.ready.appendleft(pooled)

    def kick(self) -> None:
        if not self._closed and (self._refill is None or self._refill.done()):
            self._refill = asyncio.get_running_loop().create_task(self._fill(), name="pool-refill")

    async def _fill(self) -> None:
        while not self._closed and self.held < self.size and self.room() > 0:
            self.filling += 1
            try:
                pooled = await self._make_one()
            except BridgeError as exc:
                log.warning("pool %s: could not make a container: %s; retrying in %.0f s", self.profile, exc.detail,
                        RETRY_AFTER_FAILURE)
                try:
                    await asyncio.wait_for(self._closing.wait(), RETRY_AFTER_FAILURE)
                except TimeoutError:
                    pass
                continue
            finally:
                self.filling -= 1
            if self._closed:
                await self._remove(pooled)
                return
            self.ready.append(pooled)
            log.info("pool %s: %s ready (%d of %d)", self.profile, pooled.container.name, len(self.ready), self.size)

    async def _make_one(self) -> Pooled:
        keys = SessionKeys.generate()
        session_id = secrets.token_hex(16)
        spec = ContainerSpec(
            session_id=session_id,
            user="",
            door="pool",
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            authorized_keys=keys.authorized_keys,
            host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key,
            root=self.config.user == "root",
            profile=self.profile,
            settings=self.config,
        )
        self._making.add(session_id)
        try:
            await self._reserve(session_id)
            try:
                container = await self.backend.start(spec)
                try:
                    await wait_for_sshd(container, self.config.start_timeout)
                except BaseException:
                    await asyncio.shield(self.backend.stop(container.id))
                    raise
            except BaseException:
                await asyncio.shield(self._release(session_id))
                raise
            return Pooled(session_id, container, keys, time.monotonic(), self.profile)
        finally:
            self._making.discard(session_id)

    async def _reserve(self, session_id: str) -> None:
        """A slot for the pooled container, so that the fleet's max_total counts it."""
        if self.store is None:
            return
        if await self.store.reserve_slot(pool_slot(session_id), None, self.config.max_per_user, self.config.max_total):
            raise LimitReached(detail="the fleet is at session.max_total")

    async def _release(self, session_id: str) -> None:
        if self.store is None:
            return
        try:
            await self.store.release_slot(pool_slot(session_id))
        except StoreUnavailable as exc:
            log.warning("pool: slot of %.12s not released (the reaper will): %s", session_id, exc.detail)

    async def _remove(self, pooled: Pooled) -> None:
        try:
            await self.backend.stop(pooled.container.id)
        except BridgeError as exc:
            log.warning("pool: removing %s failed: %s (the reaper will retry)", pooled.container.name, exc.detail)
            return
        await self._release(pooled.session_id)

    async def close(self) -> None:
        """Stop refilling and remove every pooled container. A container being made is waited
        for (not cancelled: its backend thread would go on and leave it behind) and removed."""
        self._closed = True
        self._closing.set()
        if self._refill is not None:
            await asyncio.gather(self._refill, return_exceptions=True)
        while self.ready:
            await self._remove(self.ready.popleft())


class WarmPools:
    """The warm pools of every profile that keeps one, as one: what they hold together counts
    against max_total, the reaper leaves all their containers alone, a login takes from its
    profile's pool only."""

    def __init__(
        self, profiles: tuple[ProfileConfig, ...], backend: Backend, room: Callable[[], int], store: Store | None = None
    ) -> None:
        self.pools = {
            p.name: WarmPool(p.session.pool, backend, p.session, room, store, p.name) for p in profiles if p.session.pool
        }

    def __bool__(self) -> bool:
        return bool(self.pools)

    @property
    def held(self) -> int:
        return sum(pool.held for pool in self.pools.values())

    @property
    def ready(self) -> list[Pooled]:
        """Every ready container, of every profile."""
        return [pooled for pool in self.pools.values() for pooled in pool.ready]

    def ready_for(self, profile: str) -> bool:
        pool = self.pools.get(profile)
        return pool is not None and bool(pool.ready)

    def ids(self) -> set[str]:
        return set().union(*(pool.ids() for pool in self.pools.values()))

    def take(self, profile: str) -> Pooled | None:
        pool = self.pools.get(profile)
        return pool.take() if pool is not None else None

    def give_back(self, pooled: Pooled) -> None:
        self.pools[pooled.profile].give_back(pooled)

    def kick(self) -> None:
        """Let every pool refill (a slot was freed: the first to ask gets it)."""
        for pool in self.pools.values():
            pool.kick()

    def reconfigure(self, profiles: tuple[ProfileConfig, ...]) -> None:
        """A reload changed settings: new pooled containers are made with them."""
        for profile in profiles:
            if profile.name in self.pools:
                self.pools[profile.name].config = profile.session

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
