"""PAM authentication in a dedicated, bounded thread pool; never on the event loop.

Like JupyterHub's PAMAuthenticator: authenticate, then the account stage (expired and locked
accounts fail there or before); no PAM session is opened (pam_loginuid and pam_systemd do not
belong to a long-running gateway).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
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
# A login refused before PAM (unknown name, nologin shell, outside auth.allowed_groups, a bad
# password field) still goes through PAM, for this name that no account can have (":" separates
# /etc/passwd fields) and a dummy password: the refusal then takes exactly as long as PAM takes to
# refuse a wrong password (pam_unix's delay, randomised by libpam), so its timing does not tell
# whether an account exists or may log in.
DECOY_USER = "termbridge:no-such-user"


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
    """A typed login name fit for logs, audit events and metrics. People type their password into
    the username field, and a password may well look like a user name: so the name is shown only
    when it is the name of an account on this host, otherwise only its length."""
    if valid_username(name):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            pass
    return f"<unknown name, {len(name)} chars>"


def groups_of(username: str) -> frozenset[str]:
    """The host groups `username` belongs to, primary group included; empty for an unknown name.
    Read afresh at every call, so that `gpasswd -d` takes effect at the next check. It may ask
    NSS (LDAP, SSSD): callers on the event loop use `member_of`."""
    try:
        return frozenset(_user_groups(pwd.getpwnam(username)))
    except KeyError:
        return frozenset()


async def member_of(username: str, groups: tuple[str, ...] | frozenset[str]) -> bool:
    """Whether `username` is in any of `groups` right now (never, when `groups` is empty)."""
    if not groups:
        return False
    return bool(frozenset(groups) & await asyncio.to_thread(groups_of, username))


def _user_groups(entry: pwd.struct_passwd) -> set[str]:
    names = {g.gr_name for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    try:
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
    except KeyError:
        pass
    return names


def _shadow_hashes(username: str) -> tuple[str, str]:
    """(the password field of `username` in /etc/shadow, the first real password hash there);
    empty strings for what is not found."""
    own = first = ""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                field = rest.partition(":")[0]
                if name == username:
                    own = field
                if not first and field.startswith("$"):
                    first = field
    except OSError:
        pass
    return own, first


def _password_locked(username: str) -> bool:
    """`usermod -L` / `passwd -l` put "!" before the hash. PAM's account stage does not look at
    it (only authentication would fail), so a key login checks it here, like the web door refuses
    a locked account."""
    return _shadow_hashes(username)[0].startswith("!")


_CRYPT_DATA_SIZE = 32768  # libxcrypt's struct crypt_data


@functools.cache
def _crypt_rn() -> Callable[..., bytes | None] | None:
    """libcrypt's reentrant crypt_rn (what pam_unix hashes with), or None without libcrypt."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    fn = ctypes.CDLL(name).crypt_rn
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    return fn  # type: ignore[no-any-return]


def _hash_like_pam(username: str) -> None:
    """The work pam_unix does for a wrong password, done for nothing: hash a dummy password with
    the account's own stored hash settings (or another account's, for an unknown name). Without
    it, a refusal before PAM would be quicker by the hashing time, more so on a loaded host."""
    own, first = _shadow_hashes(username)
    setting = own if own.startswith("$") else first
    crypt_rn = _crypt_rn()
    if setting and crypt_rn is not None:
        crypt_rn(b"-", setting.encode(), ctypes.create_string_buffer(_CRYPT_DATA_SIZE), _CRYPT_DATA_SIZE)


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


ACCOUNT_CHECK_WORKERS = 2


class PamAuthenticator:
    def __init__(self, service: str, allowed_groups: tuple[str, ...] = (), workers: int = 4) -> None:
        self.service = service
        self.allowed_groups = frozenset(allowed_groups)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pam")
        # The password-less checks (key logins, re-checks at every web session start) have threads
        # of their own: they take a millisecond, and must not wait behind a class's password
        # hashing (a lab logging in at once would otherwise open its terminals only after the
        # last password of the class was checked).
        self._checks = ThreadPoolExecutor(max_workers=ACCOUNT_CHECK_WORKERS, thread_name_prefix="pam-account")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._checks.shutdown(wait=False, cancel_futures=True)

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
        if precheck.ok and (
            not password or len(password.encode("utf-8", "surrogateescape")) > MAX_PASSWORD_BYTES or "\0" in password
        ):
            precheck = AuthResult(Outcome.DENIED, reason="empty, oversized or malformed password")
        if not precheck.ok:  # as long as a wrong password takes: pam_unix's hashing, then PAM's delay
            _hash_like_pam(username)
            decoy = self._pam(precheck, DECOY_USER, "-", rhost)
            return decoy if decoy.outcome is Outcome.UNAVAILABLE else precheck
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
        self, what: str, username: str, rhost: str | None, pool: ThreadPoolExecutor, fn: Callable[..., AuthResult],
        *args: object,
    ) -> AuthResult:
        result = await asyncio.get_running_loop().run_in_executor(pool, fn, username, *args)
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
        """PAM's verdict. A refusal takes as long whether or not the account exists and may log
        in (see DECOY_USER): its timing must not tell who has an account here."""
        return await self._run("login", username, rhost, self._pool, self._authenticate_sync, password, rhost)

    async def authorize_key(self, username: str, rhost: str | None = None) -> AuthResult:
        """Whether this account may log in with a public key: the same rules as a password login
        (name, shell, groups, locked, and PAM's account stage for expiry), minus the password."""
        return await self._run("key login account check", username, rhost, self._checks, self._key_login_sync, rhost)

    async def recheck(self, username: str, rhost: str | None = None) -> AuthResult:
        """Whether an account that logged in earlier still may: the checks of `authorize_key`.
        Asked at every web session start and periodically, so only refusals are logged."""
        result = await asyncio.get_running_loop().run_in_executor(self._checks, self._key_login_sync, username, rhost)
        if not result.ok:
            log.info("account re-check %s for %r: %s", result.outcome.value, printable_username(username), result.reason)
        return result
