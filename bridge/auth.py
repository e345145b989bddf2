"""PAM authentication in a dedicated, bounded thread pool; never on the event loop.

Like JupyterHub's PAMAuthenticator: authenticate, then the account stage (expired and locked
accounts fail there or before); no PAM session is opened (pam_loginuid and pam_systemd do not
belong to a long-running gateway).
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import grp
import logging
import os
import pwd
import random
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pam

log = logging.getLogger("termbridge.auth")

# Names that are safe to use as a container user name as well.
_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_NOLOGIN_SHELLS = ("nologin", "false")
MAX_PASSWORD_BYTES = 1024
PAM_RHOST = 4
# OPEN_ERR, SYMBOL_ERR, SERVICE_ERR, SYSTEM_ERR, BUF_ERR, ABORT, MODULE_UNKNOWN: the PAM stack is
# broken, not the password; the person is told login is unavailable, the admin gets the code.
_PAM_BROKEN = frozenset({1, 2, 3, 4, 5, 26, 28})
# A refusal decided without PAM (unknown name, nologin shell, outside auth.allowed_groups, an
# empty password) is answered only as late as PAM answers a wrong password: a duration drawn from
# the last FAILURE_SAMPLES of those, or, before there are any, pam_unix's 2 s delay +-25 %.
FAILURE_SAMPLES = 32
DEFAULT_FAILURE_DELAY = 2.0


class Outcome(enum.Enum):
    OK = "ok"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"
    THROTTLED = "throttled"  # refused before PAM was asked (see throttle.py)


@dataclass(frozen=True)
class AuthenticatedUser:
    """A person PAM vouched for. Only this type reaches the session layer."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class AuthResult:
    outcome: Outcome
    user: AuthenticatedUser | None = None
    reason: str = ""  # for the log only; the person sees one neutral message
    retry_after: int = 0  # THROTTLED: seconds until the next attempt may be heard

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


def valid_username(name: str) -> bool:
    return bool(_USERNAME_RE.match(name))


def printable_username(name: str) -> str:
    """A typed login name fit for logs, audit events and metrics. People type their password into
    the username field, and a password may well look like a user name: so the name is shown only
    when it is the name of an account on this host, otherwise only its length."""
    if valid_username(name):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            pass
    return f"<unknown name, {len(name)} chars>"


def _user_groups(entry: pwd.struct_passwd) -> set[str]:
    names = {g.gr_name for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    try:
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
    except KeyError:
        pass
    return names


def _password_locked(username: str) -> bool:
    """`usermod -L` / `passwd -l` put "!" before the hash. PAM's account stage does not look at
    it (only authentication would fail), so a key login checks it here, like the web door refuses
    a locked account."""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name == username:
                    return rest.startswith("!")
    except OSError:
        pass
    return False


def _skip_authenticate(_handle: object, _flags: int) -> int:
    return 0  # PAM_SUCCESS: used in place of pam_authenticate when a key was the proof


class _RhostPam(pam.PamAuthenticator):
    """python-pam with PAM_RHOST set right after pam_start, so modules see the client address."""

    def __init__(self, rhost: str | None) -> None:
        super().__init__()
        if rhost:
            start = self.pam_start

            def start_with_rhost(*args):  # type: ignore[no-untyped-def]
                rc = start(*args)
                if rc == 0 and self.handle is not None:
                    self.pam_set_item(self.handle, PAM_RHOST, ctypes.c_char_p(rhost.encode()))
                return rc

            self.pam_start = start_with_rhost


class PamAuthenticator:
    def __init__(self, service: str, allowed_groups: tuple[str, ...] = (), workers: int = 4) -> None:
        self.service = service
        self.allowed_groups = frozenset(allowed_groups)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pam")
        self._failure_times: deque[float] = deque(maxlen=FAILURE_SAMPLES)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def account_check(self, username: str) -> AuthResult:
        """The checks that need no password: name, shell, groups. Also used for public keys."""
        if not valid_username(username):
            return AuthResult(Outcome.DENIED, reason="invalid user name")
        try:
            entry = pwd.getpwnam(username)
        except KeyError:
            return AuthResult(Outcome.DENIED, reason="no such user")
        if os.path.basename(entry.pw_shell or "") in _NOLOGIN_SHELLS:
            return AuthResult(Outcome.DENIED, reason=f"login shell is {entry.pw_shell}")
        if self.allowed_groups and not (self.allowed_groups & _user_groups(entry)):
            return AuthResult(Outcome.DENIED, reason="not in auth.allowed_groups")
        return AuthResult(Outcome.OK, AuthenticatedUser(entry.pw_name, entry.pw_uid, entry.pw_gid))

    def _authenticate_sync(self, username: str, password: str, rhost: str | None) -> tuple[AuthResult, bool]:
        """PAM's verdict, and whether PAM was asked at all."""
        precheck = self.account_check(username)
        if not precheck.ok:
            return precheck, False
        if not password or len(password.encode("utf-8", "surrogateescape")) > MAX_PASSWORD_BYTES or "\0" in password:
            return AuthResult(Outcome.DENIED, reason="empty, oversized or malformed password"), False
        return self._pam(precheck, username, password, rhost), True

    def _key_login_sync(self, username: str, rhost: str | None) -> tuple[AuthResult, bool]:
        precheck = self.account_check(username)
        if not precheck.ok:
            return precheck, False
        if _password_locked(username):
            return AuthResult(Outcome.DENIED, reason="account is locked"), False
        return self._pam(precheck, username, None, rhost), True

    def _pam(self, precheck: AuthResult, username: str, password: str | None, rhost: str | None) -> AuthResult:
        """The PAM conversation; without a password (a key already proved who it is) only the
        account stage runs, so expired accounts are refused the same way for keys."""
        handle = _RhostPam(rhost)
        if password is None:
            handle.pam_authenticate = _skip_authenticate
        try:
            ok = handle.authenticate(username, password or "", service=self.service, resetcreds=False)
        except Exception as exc:  # libpam missing or broken: not the person's fault
            return AuthResult(Outcome.UNAVAILABLE, reason=f"PAM failed: {exc!r}")
        if ok:
            return precheck
        reason = f"PAM: {handle.reason} (code {handle.code})"
        if handle.code in _PAM_BROKEN:
            return AuthResult(Outcome.UNAVAILABLE, reason=reason)
        return AuthResult(Outcome.DENIED, reason=reason)

    async def _run(
        self, what: str, username: str, rhost: str | None, fn: Callable[..., tuple[AuthResult, bool]], *args: object
    ) -> tuple[AuthResult, bool]:
        """Run `fn` in a PAM worker and log its verdict; (verdict, whether PAM was asked)."""
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self._pool, fn, username, *args)
        result = outcome[0]
        log.info(
            "%s %s for %r from %s%s",
            what,
            result.outcome.value,
            printable_username(username),
            rhost or "-",
            f": {result.reason}" if result.reason else "",
        )
        return outcome

    async def authenticate(self, username: str, password: str, rhost: str | None = None) -> AuthResult:
        """PAM's verdict. A refusal takes as long whether or not the account exists and may log
        in (see FAILURE_SAMPLES): its timing must not tell who has an account here."""
        started = time.monotonic()
        result, asked_pam = await self._run("login", username, rhost, self._authenticate_sync, password, rhost)
        if result.outcome is Outcome.DENIED:
            took = time.monotonic() - started
            if asked_pam:
                self._failure_times.append(took)
            else:
                await asyncio.sleep(max(0.0, self._failure_time() - took))  # on the loop, not in a PAM worker
        return result

    def _failure_time(self) -> float:
        """How long PAM takes to refuse a wrong password here, drawn from what it took lately."""
        if self._failure_times:
            return random.choice(self._failure_times)
        return DEFAULT_FAILURE_DELAY * random.uniform(0.75, 1.25)

    async def authorize_key(self, username: str, rhost: str | None = None) -> AuthResult:
        """Whether this account may log in with a public key: the same rules as a password login
        (name, shell, groups, locked, and PAM's account stage for expiry), minus the password."""
        return (await self._run("key login account check", username, rhost, self._key_login_sync, rhost))[0]
