"""Login throttling for both front doors, applied before PAM is asked.

pam_unix already delays each failure by about 2 s, but only inside a PAM worker: a flood of
wrong passwords would occupy the bounded PAM pool and starve everyone else. So the throttle
decides first, on the event loop and without PAM:

- every username and every client address (IPv6 by /64) has its failures of the last
  `auth.failure_window`; with n of them, the next attempt first waits 2^(n-1) s (capped at
  MAX_DELAY): repeated failures get slower;
- at `auth.max_failures` (username) or `auth.max_failures_per_address` the key is locked out
  until `auth.lockout` has passed since its last failure: the web door answers 429, the SSH
  door disconnects, and PAM is not asked at all;
- one address, and one username, has at most MAX_PENDING attempts in flight (waiting or in PAM,
  until PAM answers even when the client gave up); more are refused like a lockout, so one address
  can never hold every PAM worker.

The table holds at most MAX_KEYS records. When it is full, expired records go first, then the
oldest that are not locked out; a lockout is never forgotten before it ends, so a flood of new
names or addresses cannot release one. When even that frees nothing (the table is all lockouts),
attempts under names and addresses it does not know are refused until some lockout ends.

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
from dataclasses import dataclass, field

from .auth import AuthResult, Outcome, PamAuthenticator, printable_username
from .config import AuthConfig

log = logging.getLogger("termbridge.throttle")

MAX_DELAY = 8.0
MAX_PENDING = 3
MAX_KEYS = 100_000
PRUNE_EVERY = 60.0


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


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0

    @property
    def last_failure(self) -> float:
        return self.failures[-1] if self.failures else 0.0


@dataclass(frozen=True)
class Decision:
    """What the throttle says about one attempt: refused (for `retry_after` s) or allowed after
    waiting `delay` s."""

    allowed: bool
    delay: float = 0.0
    retry_after: float = 0.0
    why: str = ""


class LoginThrottle:
    """The bookkeeping: pure, driven by an injectable clock, so it is testable alone."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._records: dict[tuple[str, str], _Record] = {}
        self._pending: dict[tuple[str, str], int] = {}
        self._pruned = clock()

    def _limit(self, kind: str) -> int:
        return self.config.max_failures if kind == "user" else self.config.max_failures_per_address

    def _record(self, kind: str, key: str, now: float, create: bool = False) -> _Record | None:
        record = self._records.get((kind, key))
        if record is None:
            if not create:
                return None
            if len(self._records) >= MAX_KEYS:
                self._prune(now, force=True)
            if len(self._records) >= MAX_KEYS:
                return None  # full of lockouts: check() refuses new keys until some expire
            record = self._records[(kind, key)] = _Record()
        while record.failures and record.failures[0] <= now - self.config.failure_window:
            record.failures.popleft()
        return record

    def _prune(self, now: float, force: bool = False) -> None:
        if not force and now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        horizon = now - self.config.failure_window
        for key, record in list(self._records.items()):
            if record.locked_until <= now and record.last_failure <= horizon:
                del self._records[key]
        if len(self._records) >= MAX_KEYS:
            # Still full of live keys: forget the oldest half of those that are not locked out.
            # A lockout is never forgotten early, so a flood of new names cannot release one.
            unlocked = sorted(
                (key for key, record in self._records.items() if record.locked_until <= now),
                key=lambda key: self._records[key].last_failure,
            )
            for key in unlocked[: max(1, len(self._records) // 2)]:
                del self._records[key]

    def _keys(self, username: str, address: str | None) -> list[tuple[str, str]]:
        return [("user", username.lower()[:64]), ("addr", address_key(address))]

    def check(self, username: str, address: str | None) -> Decision:
        """May this attempt go to PAM, and after how long a wait?"""
        now = self.clock()
        self._prune(now, force=len(self._records) >= MAX_KEYS and now - self._pruned >= 1.0)
        for kind, key in self._keys(username, address):
            if self._pending.get((kind, key), 0) >= MAX_PENDING:
                return Decision(False, retry_after=1.0, why=f"{MAX_PENDING} attempts for this {kind} in flight")
        delay = 0.0
        for kind, key in self._keys(username, address):
            record = self._record(kind, key, now)
            if record is None:
                if len(self._records) >= MAX_KEYS:  # a failure could not be counted: refuse
                    return Decision(False, retry_after=1.0, why="the throttle table is full of lockouts")
                continue
            if record.locked_until > now:
                return Decision(False, retry_after=record.locked_until - now, why=f"{kind} locked out")
            if record.failures:
                delay = max(delay, min(MAX_DELAY, 2.0 ** (len(record.failures) - 1)))
        return Decision(True, delay=delay)

    def begin(self, username: str, address: str | None) -> None:
        for key in self._keys(username, address):
            self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, username: str, address: str | None) -> None:
        for key in self._keys(username, address):
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)

    def failure(self, username: str, address: str | None) -> None:
        now = self.clock()
        for kind, key in self._keys(username, address):
            record = self._record(kind, key, now, create=True)
            if record is None:
                log.warning("login throttle: table full of lockouts, a failure of %s %s not counted", kind,
                            key if kind == "addr" else printable_username(key))
                continue
            record.failures.append(now)
            if len(record.failures) >= self._limit(kind):
                record.locked_until = now + self.config.lockout
                log.warning(
                    "login throttle: %s %s locked out for %.0f s after %d failures",
                    kind, key if kind == "addr" else printable_username(key), self.config.lockout, len(record.failures),
                )

    def success(self, username: str, address: str | None) -> None:
        self._records.pop(self._keys(username, address)[0], None)


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

    def close(self) -> None:
        self.inner.close()

    async def authenticate(self, username: str, password: str, address: str | None = None) -> AuthResult:
        """PAM's verdict, or `Outcome.THROTTLED` without asking PAM. `address` is the real client
        address (it also becomes PAM_RHOST)."""
        decision = self.throttle.check(username, address)
        if not decision.allowed:
            log.warning(
                "login throttled for %r from %s: %s", printable_username(username), address or "-", decision.why
            )
            return AuthResult(
                Outcome.THROTTLED, reason=decision.why, retry_after=max(1, math.ceil(decision.retry_after))
            )
        self.throttle.begin(username, address)
        try:
            if decision.delay:
                await asyncio.sleep(decision.delay)
            result = await self.inner.authenticate(username, password, address)
        finally:
            self.throttle.end(username, address)
        if result.outcome is Outcome.DENIED:
            self.throttle.failure(username, address)
        elif result.ok:
            self.throttle.success(username, address)
        return result
