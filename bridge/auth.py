"""PAM authentication in a dedicated, bounded thread pool; never on the event loop.

Like JupyterHub's PAMAuthenticator: authenticate, then the account stage (expired and locked
accounts fail there or before); no PAM session is opened (pam_loginuid and pam_systemd do not
belong to a long-running gateway).
"""

from __future__ import annotations

import asyncio
import ctypes
import grp
import logging
import os
import pwd
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pam

from .vocab import LoginResult

log = logging.getLogger("termbridge.auth")

# Names that are safe to use as a container user name as well.
_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_NOLOGIN_SHELLS = ("nologin", "false")
MAX_PASSWORD_BYTES = 1024
PAM_RHOST = 4
# OPEN_ERR, SYMBOL_ERR, SERVICE_ERR, SYSTEM_ERR, BUF_ERR, ABORT, MODULE_UNKNOWN: the PAM stack is
# broken, not the password; the person is told login is unavailable, the admin gets the code.
_PAM_BROKEN = frozenset({1, 2, 3, 4, 5, 26, 28})


Outcome = LoginResult  # an authenticator's verdict is the login result every door reports


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
    """A login name fit for the log. Anything that cannot be a user name is not logged: people
    type their password into the username field."""
    return name if valid_username(name) else f"<invalid name, {len(name)} chars>"


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

    def _authenticate_sync(self, username: str, password: str, rhost: str | None) -> AuthResult:
        precheck = self.account_check(username)
        if not precheck.ok:
            return precheck
        if not password or len(password.encode("utf-8", "surrogateescape")) > MAX_PASSWORD_BYTES or "\0" in password:
            return AuthResult(Outcome.DENIED, reason="empty, oversized or malformed password")
        return self._pam(precheck, username, password, rhost)

    def _key_login_sync(self, username: str, rhost: str | None) -> AuthResult:
        precheck = self.account_check(username)
        if not precheck.ok:
            return precheck
        if _password_locked(username):
            return AuthResult(Outcome.DENIED, reason="account is locked")
        return self._pam(precheck, username, None, rhost)

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
        self, what: str, username: str, rhost: str | None, fn: Callable[..., AuthResult], *args: object
    ) -> AuthResult:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._pool, fn, username, *args)
        log.info(
            "%s %s for %r from %s%s",
            what,
            result.outcome.value,
            printable_username(username),
            rhost or "-",
            f": {result.reason}" if result.reason else "",
        )
        return result

    async def authenticate(self, username: str, password: str, rhost: str | None = None) -> AuthResult:
        return await self._run("login", username, rhost, self._authenticate_sync, password, rhost)

    async def authorize_key(self, username: str, rhost: str | None = None) -> AuthResult:
        """Whether this account may log in with a public key: the same rules as a password login
        (name, shell, groups, locked, and PAM's account stage for expiry), minus the password."""
        return await self._run("key login account check", username, rhost, self._key_login_sync, rhost)

    async def recheck(self, username: str, rhost: str | None = None) -> AuthResult:
        """Whether an account that logged in earlier still may: the checks of `authorize_key`.
        Asked at every web session start and periodically, so only refusals are logged."""
        result = await asyncio.get_running_loop().run_in_executor(self._pool, self._key_login_sync, username, rhost)
        if not result.ok:
            log.info("account re-check %s for %r: %s", result.outcome.value, printable_username(username), result.reason)
        return result
