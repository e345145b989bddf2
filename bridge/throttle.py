"""Login throttling for both front doors, applied before PAM is asked, counted in the state store
so that every gateway sharing it counts together: guesses spread over several gateways lock an
account out on all of them.

pam_unix already delays each failure by about 2 s, but only inside a PAM worker: a flood of
wrong passwords would occupy the bounded PAM pool and starve everyone else. So the throttle
decides first, without PAM:

- every username and every client address (IPv6 by /64) has its failures of the last
  `auth.failure_window`; with n of them, the next attempt first waits 2^(n-1) s (capped at
  MAX_DELAY): repeated failures get slower;
- at `auth.max_failures` (username) or `auth.max_failures_per_address` the key is locked out
  until `auth.lockout` has passed since its last failure: the web door answers 429, the SSH
  door disconnects, and PAM is not asked at all;
- one address, and one username, has at most MAX_PENDING attempts in flight on this gateway
  (being checked, waiting or in PAM, until PAM answers even when the client gave up), so one
  address can never hold every PAM worker. More attempts of one username are refused like a
  lockout. More from one address (a class behind one NAT address logging in at once) wait in
  line, first come first served, up to MAX_QUEUED; past that they are refused too. A waiting
  attempt counts for its username already, and is checked (lockouts, delays) only when its turn
  comes. What is in flight is this process's own business and stays in its memory.

The counters and lockouts live in the store (`Store.add_failure`, `lock`, ...), which forgets
them on its own once they are over (Redis expiries, SQLite purges). Only an answer from PAM adds
a failure, so the store grows no faster than the PAM pool answers; nothing a flood does can
evict a lockout. A store that does not answer refuses the login as unavailable (fail closed).

A success clears the username's failures (not the address's: one valid account must not
launder an address that guesses other people's passwords).

`ThrottledAuthenticator` wraps the PAM authenticator with the same interface; a door calls
`authenticate(username, password, address)` and gets `Outcome.THROTTLED` (with `retry_after`)
when it must refuse without asking PAM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .auth import AuthResult, Outcome, PamAuthenticator, printable_username
from .config import AuthConfig
from .errors import StoreUnavailable
from .store import Store

log = logging.getLogger("termbridge.throttle")

MAX_DELAY = 8.0
MAX_PENDING = 3
MAX_QUEUED = 64  # attempts waiting per address: a large class behind one NAT address


def address_key(address: str | None) -> str:
    """The throttling key of a client address: IPv4 as is, IPv6 by its /64 (one site or host)."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Decision:
    """What the throttle says about one attempt: refused (for `retry_after` s) or allowed after
    waiting `delay` s."""

    allowed: bool
    delay: float = 0.0
    retry_after: float = 0.0
    why: str = ""


class LoginThrottle:
    """The bookkeeping, over the store's counters; `clock` gives wall-clock epoch seconds, the
    time every gateway sharing the store agrees on (injectable, so it is testable alone)."""

    def __init__(self, config: AuthConfig, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._pending: dict[tuple[str, str], int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # by address key: attempts in line

    def _limit(self, kind: str) -> int:
        return self.config.max_failures if kind == "user" else self.config.max_failures_per_address

    def _keys(self, username: str, address: str | None) -> list[tuple[str, str]]:
        return [("user", username.lower()[:64]), ("addr", address_key(address))]

    def busy(self, username: str, address: str | None) -> Decision | None:
        """The refusal when MAX_PENDING attempts of this name are in flight here, or this address
        has MAX_PENDING in flight and MAX_QUEUED waiting. Synchronous, so that the caller's
        `begin` follows it with no other attempt between."""
        (_, name), (_, addr) = self._keys(username, address)
        if self._pending.get(("user", name), 0) >= MAX_PENDING:
            return Decision(False, retry_after=1.0, why=f"{MAX_PENDING} attempts for this user in flight")
        if self._pending.get(("addr", addr), 0) >= MAX_PENDING and len(self._waiting.get(addr, ())) >= MAX_QUEUED:
            return Decision(False, retry_after=1.0, why=f"{MAX_PENDING} attempts for this addr in flight, {MAX_QUEUED} waiting")
        return None

    async def check(self, username: str, address: str | None) -> Decision:
        """May this attempt go to PAM, and after how long a wait? Raises StoreUnavailable."""
        now, delay = self.clock(), 0.0
        for kind, key in self._keys(username, address):
            until = await self.store.locked_until(f"{kind}:{key}", now)
            if until is not None:
                return Decision(False, retry_after=until - now, why=f"{kind} locked out")
            failures = await self.store.failures(f"{kind}:{key}", now, self.config.failure_window)
            if failures:
                delay = max(delay, min(MAX_DELAY, 2.0 ** (failures - 1)))
        return Decision(True, delay=delay)

    def begin(self, username: str, address: str | None) -> asyncio.Future[None] | None:
        """Count the attempt in flight (call right after `busy` said None). None: it may go on
        now; else its address has MAX_PENDING in flight and this is its place in line, to
        `wait_turn` for."""
        user_key, addr_key = self._keys(username, address)
        self._pending[user_key] = self._pending.get(user_key, 0) + 1
        if self._pending.get(addr_key, 0) < MAX_PENDING and not self._waiting.get(addr_key[1]):
            self._pending[addr_key] = self._pending.get(addr_key, 0) + 1
            return None
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(addr_key[1], deque()).append(turn)
        return turn

    async def wait_turn(self, username: str, address: str | None, turn: asyncio.Future[None]) -> None:
        """Until an attempt of the address `end`s and hands its place over (the count stays as
        it was). Cancelled, the attempt leaves the line and counts no more."""
        user_key, addr_key = self._keys(username, address)
        try:
            await turn
        except BaseException:
            self._leave_line(addr_key[1], turn)
            self._drop(user_key)
            if turn.done() and not turn.cancelled():
                self._release_addr(addr_key)  # handed the place as it was cancelled: pass it on
            raise

    def end(self, username: str, address: str | None) -> None:
        user_key, addr_key = self._keys(username, address)
        self._drop(user_key)
        self._release_addr(addr_key)

    def _release_addr(self, addr_key: tuple[str, str]) -> None:
        """One attempt of this address is over: the first in line takes its place, or the count drops."""
        line = self._waiting.get(addr_key[1])
        while line:
            turn = line.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._waiting.pop(addr_key[1], None)
        self._drop(addr_key)

    def _leave_line(self, addr: str, turn: asyncio.Future[None]) -> None:
        line = self._waiting.get(addr)
        if line is not None and turn in line:
            line.remove(turn)
        if line is not None and not line:
            self._waiting.pop(addr, None)

    def _drop(self, key: tuple[str, str]) -> None:
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)

    async def failure(self, username: str, address: str | None) -> None:
        """Count a failure on every gateway; lock the key out at its limit. Raises StoreUnavailable."""
        now = self.clock()
        for kind, key in self._keys(username, address):
            count = await self.store.add_failure(f"{kind}:{key}", now, self.config.failure_window)
            if count >= self._limit(kind):
                await self.store.lock(f"{kind}:{key}", now + self.config.lockout)
                log.warning(
                    "login throttle: %s %s locked out for %.0f s after %d failures",
                    kind, key if kind == "addr" else printable_username(key), self.config.lockout, count,
                )

    async def success(self, username: str, address: str | None) -> None:
        kind, key = self._keys(username, address)[0]
        await self.store.clear(f"{kind}:{key}")


class ThrottledAuthenticator:
    """The PAM authenticator behind the throttle; the interface both doors use."""

    def __init__(self, inner: PamAuthenticator, throttle: LoginThrottle) -> None:
        self.inner = inner
        self.throttle = throttle

    def account_check(self, username: str) -> AuthResult:
        return self.inner.account_check(username)

    async def authorize_key(self, username: str, address: str | None = None) -> AuthResult:
        """Public keys cannot be guessed: no throttle, the account checks only."""
        return await self.inner.authorize_key(username, address)

    async def recheck(self, username: str, address: str | None = None) -> AuthResult:
        """An earlier login's account, asked again (no throttling: no password is guessed)."""
        return await self.inner.recheck(username, address)

    def close(self) -> None:
        self.inner.close()

    @staticmethod
    def _throttled(username: str, address: str | None, decision: Decision) -> AuthResult:
        log.warning("login throttled for %r from %s: %s", printable_username(username), address or "-", decision.why)
        return AuthResult(Outcome.THROTTLED, reason=decision.why, retry_after=max(1, math.ceil(decision.retry_after)))

    async def authenticate(self, username: str, password: str, address: str | None = None) -> AuthResult:
        """PAM's verdict, or `Outcome.THROTTLED` without asking PAM (`Outcome.UNAVAILABLE` when
        the store cannot say). `address` is the real client address (it also becomes PAM_RHOST).
        An attempt its client abandons (waiting in line or in PAM) goes on to PAM's answer: it
        stays in flight until then, and a wrong password still counts."""
        busy = self.throttle.busy(username, address)
        if busy is not None:
            return self._throttled(username, address, busy)
        turn = self.throttle.begin(username, address)
        attempt = asyncio.ensure_future(self._attempt(username, password, address, turn))
        return await asyncio.shield(attempt)

    async def _attempt(
        self, username: str, password: str, address: str | None, turn: asyncio.Future[None] | None
    ) -> AuthResult:
        if turn is not None:
            await self.throttle.wait_turn(username, address, turn)
        try:
            try:
                decision = await self.throttle.check(username, address)
            except StoreUnavailable as exc:
                log.error("login of %r from %s refused: %s", printable_username(username), address or "-", exc.detail)
                return AuthResult(Outcome.UNAVAILABLE, reason="the state store did not answer")
            if not decision.allowed:
                return self._throttled(username, address, decision)
            if decision.delay:
                await asyncio.sleep(decision.delay)
            result = await self.inner.authenticate(username, password, address)
        finally:
            self.throttle.end(username, address)
        try:
            if result.outcome is Outcome.DENIED:
                await self.throttle.failure(username, address)
            elif result.ok:
                await self.throttle.success(username, address)
        except StoreUnavailable as exc:
            log.error("login throttle: %s of %r not recorded: %s", result.outcome, printable_username(username), exc.detail)
        return result
