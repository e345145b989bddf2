"""The SSH door: plain ssh, sftp and scp clients get a fresh container per connection.

The gateway is an asyncssh server. Once PAM (or a key from the host user's authorized_keys)
vouches for the person, the connection gets one session from the session manager: a container
and an SSH connection into its sshd. Every channel the client opens (shell, exec, the sftp
subsystem) is opened again on that upstream connection and joined to it with
`SSHServerProcess.redirect()`, which carries data, EOF, window-change, break and signals; the exit
status or exit signal goes back to the client. Only sessions are served: TCP, agent and X11
forwarding are refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import stat
import time
from collections.abc import Coroutine
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from .auth import AuthenticatedUser, AuthResult, Outcome, printable_username, valid_username
from .config import Config
from .errors import AuthUnavailable, BridgeError, ConfigError
from .session import Session
from .sessions import SessionManager
from .throttle import ThrottledAuthenticator
from .vocab import Door, EndReason, LoginResult

log = logging.getLogger("termbridge.ssh")
T = TypeVar("T")

# OpenSSH clients try a password 3 times, then keyboard-interactive (which asyncssh also serves
# from the password check) 3 more: the connection ends after the third wrong answer overall.
MAX_PASSWORD_TRIES = 3
MAX_AUTHORIZED_KEYS_BYTES = 1024 * 1024
# A connection whose session could not start and that opened no channel to hear why (ssh -N)
# is closed after this long, with the reason as the disconnect message.
FAILED_START_LINGER = 5.0
# After a session ended, how long its channels have to say goodbye before the connection closes.
CLOSE_GRACE = 2.0
PASSED_ENV = ("LANG", "TERM")
# The audit trail keeps how the last this many channels of a connection ended.
MAX_CHANNEL_RECORDS = 64
COMMAND_KINDS = ("shell", "exec")
# asyncssh keeps every `env` request on the channel until it closes: a client could fill the
# gateway's memory with them. Only names that pass are kept, and only this many and this much.
MAX_ENV_VARS = 32  # per channel
MAX_ENV_BYTES = 16 * 1024  # names and values, per channel
MAX_ENV_BYTES_PER_CONNECTION = 256 * 1024  # over all its channels, for its whole life


class _HideTypedNames(logging.Filter):
    """asyncssh logs the user name a client sent ("Beginning auth for user %s"), and people type
    their password there: such a name is logged as `printable_username` shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "user %s" in str(record.msg) and isinstance(record.args, tuple):
            record.args = tuple(printable_username(a) if isinstance(a, str) else a for a in record.args)
        return True


_HIDE_TYPED_NAMES = _HideTypedNames()


def _env_passes(name: str) -> bool:
    return name in PASSED_ENV or name.startswith("LC_")


class _EnvBudget:
    """What one connection may still store of `env` requests (see MAX_ENV_BYTES_PER_CONNECTION)."""

    def __init__(self) -> None:
        self.left = MAX_ENV_BYTES_PER_CONNECTION
        self.refused = 0


class _EnvCappedChannel(asyncssh.SSHServerChannel):
    """A session channel that refuses `env` requests beyond the caps, and names that would not be
    passed to the container anyway (like sshd's AcceptEnv), instead of keeping them all."""

    env_budget: _EnvBudget

    def _process_env_request(self, packet: asyncssh.packet.SSHPacket) -> bool:
        name, value = packet.get_string(), packet.get_string()
        packet.check_end()
        size = len(name) + len(value)
        stored = sum(len(k) + len(v) for k, v in self._env.items() if k != name)
        budget = self.env_budget
        if not _env_passes(name.decode("utf-8", "replace")):
            return False
        if (name not in self._env and len(self._env) >= MAX_ENV_VARS) or stored + size > MAX_ENV_BYTES or size > budget.left:
            budget.refused += 1
            if budget.refused == 1:
                log.warning(
                    "ssh env requests from %s refused: over %d variables or %d bytes per channel, or %d per connection",
                    self.get_extra_info("peername", ("-",))[0], MAX_ENV_VARS, MAX_ENV_BYTES, MAX_ENV_BYTES_PER_CONNECTION,
                )
            return False
        budget.left -= size
        self._env[name] = value
        return True


# -- host key -------------------------------------------------------------------------------------


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The door's identity: ed25519, created 0600 on first start and the same on every restart,
    so clients' known_hosts entries stay valid. A key others may read is refused, as sshd does."""
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="termbridge-host")
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key("openssh"))
            os.link(temp, path)  # never a half-written key at `path`, never an existing one replaced
        except FileExistsError:
            pass  # another process created it first: use that one
        except OSError as exc:
            raise ConfigError(f"'ssh.host_key' {str(path)!r} cannot be created: {exc.strerror}") from None
        else:
            log.info("created SSH host key %s (%s)", path, key.get_fingerprint())
            return key
        finally:
            temp.unlink(missing_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"'ssh.host_key' {str(path)!r} is accessible by others (mode {mode:04o}); chmod 600 it")
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"'ssh.host_key' {str(path)!r} cannot be read: {exc}") from None


# -- authorized_keys ------------------------------------------------------------------------------


def _unsafe(st: os.stat_result, uid: int) -> bool:
    return st.st_uid not in (0, uid) or bool(st.st_mode & 0o022)


def _user_may(st: os.stat_result, entry: pwd.struct_passwd, groups: set[int], bit: int) -> bool:
    """Whether the user may read (bit 4) or search (bit 1) this by its mode bits, as the kernel
    decides it for their uid and groups."""
    if st.st_uid == entry.pw_uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def read_authorized_keys(entry: pwd.struct_passwd) -> str | None:
    """The text of ~/.ssh/authorized_keys as the user could read it, or None when it is absent or
    unsafe. The gateway runs as root, so it checks what the user's own permissions allow instead
    of trusting its own: the real file (symlinks resolved, as sshd follows them as the user) must
    be a regular file the user may read, in directories they may search, and (sshd's StrictModes)
    it and every directory up to the home directory (up to / for a file outside it) must be owned
    by the user or root and writable by no one else. A device is never opened."""
    path = Path(entry.pw_dir) / ".ssh" / "authorized_keys"
    real = Path(os.path.realpath(path))
    try:
        lst = os.lstat(real)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("authorized_keys of %s ignored: %s: %s", entry.pw_name, path, exc.strerror)
        return None
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if not stat.S_ISREG(lst.st_mode):
        log.warning("authorized_keys of %s ignored: %s is not a regular file", entry.pw_name, real)
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
    except OSError as exc:
        log.warning("authorized_keys of %s ignored: %s: %s", entry.pw_name, real, exc.strerror)
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino) or not stat.S_ISREG(st.st_mode):
            log.warning("authorized_keys of %s ignored: %s changed while it was opened", entry.pw_name, real)
            return None
        if _unsafe(st, entry.pw_uid) or not _user_may(st, entry, groups, 4):
            log.warning(
                "authorized_keys of %s ignored: bad ownership or modes for file %s (or the user may not read it)",
                entry.pw_name, real,
            )
            return None
        home = Path(os.path.realpath(entry.pw_dir))
        for directory in real.parents:
            try:
                dst = os.stat(directory)
            except OSError:
                return None
            if _unsafe(dst, entry.pw_uid) or not _user_may(dst, entry, groups, 1):
                log.warning(
                    "authorized_keys of %s ignored: bad ownership or modes for directory %s", entry.pw_name, directory
                )
                return None
            if directory == home:
                break
        data = fh.read(MAX_AUTHORIZED_KEYS_BYTES + 1)
    if len(data) > MAX_AUTHORIZED_KEYS_BYTES:
        log.warning("authorized_keys of %s ignored: larger than %d bytes", entry.pw_name, MAX_AUTHORIZED_KEYS_BYTES)
        return None
    return data.decode("utf-8", "replace")


# Options of sshd(8)'s AUTHORIZED_KEYS FILE FORMAT and what the door does with each. "keep": given
# to asyncssh, which enforces it (from= against the client address, command= as the forced
# command for shells, commands and subsystems alike, no-pty, the forwarding permissions,
# no-touch-required for security keys). "drop": nothing to enforce, since the door never forwards
# ports, agents, X11 or tunnels and runs no rc files, and environment= is ignored like sshd's
# default PermitUserEnvironment=no. "restrict", "expiry-time" are handled here. Any other option,
# and the ones asyncssh cannot enforce here (cert-authority and principals= need certificate
# checks this door does not do, verify-required needs a FIDO PIN check), make sshd-like refusal:
# the key is skipped with a log line.
_KEY_OPTIONS = {
    "agent-forwarding": "keep", "command": "keep", "from": "keep", "no-agent-forwarding": "keep",
    "no-port-forwarding": "keep", "no-pty": "keep", "no-x11-forwarding": "keep", "port-forwarding": "keep",
    "pty": "keep", "x11-forwarding": "keep", "no-touch-required": "keep",
    "no-user-rc": "drop", "user-rc": "drop", "permitlisten": "drop", "permitopen": "drop", "tunnel": "drop",
    "environment": "drop",
    "restrict": "restrict", "expiry-time": "expiry",
}
_VALUED = frozenset({"command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "tunnel"})
# restrict: every permission off, unless a later option turns one back on (as in sshd).
_RESTRICTED = ("agent-forwarding", "port-forwarding", "pty", "X11-forwarding")
_SPELLING = {"x11-forwarding": "X11-forwarding", "no-x11-forwarding": "no-X11-forwarding"}


class KeyLineError(ValueError):
    """One authorized_keys line the door will not use; the message says why, for the admin."""


def _split_options(line: str) -> tuple[list[str], str]:
    """OpenSSH's option syntax: comma-separated, double quotes protect commas and spaces (\\"
    escapes a quote), the options end at the first unquoted blank. (options, the rest)."""
    options: list[str] = []
    current = ""
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quoted and ch == "\\" and line[i + 1 : i + 2] == '"':
            current += '\\"'
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in " \t":
            break
        elif not quoted and ch == ",":
            options.append(current)
            current = ""
            i += 1
            continue
        current += ch
        i += 1
    if quoted:
        raise KeyLineError("unbalanced quote in the options")
    options.append(current)
    return options, line[i:].strip()


def _expiry(value: str) -> float:
    """expiry-time="YYYYMMDD[HHMM[SS]][Z]": local time, or UTC with Z (as sshd reads it)."""
    text = value.strip('"')
    utc = text.endswith(("Z", "z"))
    digits = text[:-1] if utc else text
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        raise KeyLineError(f"bad expiry-time {value!r}")
    moment = datetime.strptime(digits, formats[len(digits)])
    return moment.replace(tzinfo=timezone.utc).timestamp() if utc else moment.timestamp()


def _key_line(line: str, now: float) -> str:
    """One authorized_keys line as asyncssh should read it: its options checked and rewritten
    (see _KEY_OPTIONS). Raises KeyLineError for a line the door must not use."""
    try:
        asyncssh.import_public_key(line)
        return line  # a plain key, no options
    except (asyncssh.KeyImportError, ValueError):
        pass
    options, key = _split_options(line)
    kept: list[str] = []
    for option in options:
        name, has_value, value = option.partition("=")
        lname = name.lower()
        what = _KEY_OPTIONS.get(lname)
        if what is None:
            raise KeyLineError(f"option {name!r} is not supported by this gateway")
        if bool(has_value) != (lname in _VALUED):
            raise KeyLineError(f"option {option!r} is malformed")
        if what == "expiry":
            if _expiry(value) <= now:
                raise KeyLineError(f"the key expired ({option})")
        elif what == "restrict":
            kept = [o for o in kept if o.lower().removeprefix("no-") not in {p.lower() for p in _RESTRICTED}]
            kept += [f"no-{p}" for p in _RESTRICTED]
        elif what == "keep":
            if lname.startswith("no-") or has_value:
                kept.append(_SPELLING.get(lname, lname) + (f"={value}" if has_value else ""))
            else:  # a permission turned back on after restrict
                off = "no-" + _SPELLING.get(lname, lname)
                kept = [o for o in kept if o != off]
    try:
        asyncssh.import_public_key(key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyLineError(f"not a public key: {exc}") from None
    return f"{','.join(kept)} {key}" if kept else key


def parse_authorized_keys(text: str, username: str, now: float | None = None) -> asyncssh.SSHAuthorizedKeys | None:
    """The keys of an authorized_keys text that the door may use, each line on its own: a line
    that is broken, expired or carries an option the door does not implement is skipped with a log
    line, the others still work. None when no key is left (key login off; passwords still work)."""
    moment = time.time() if now is None else now
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            usable = _key_line(line, moment)
            asyncssh.SSHAuthorizedKeys(usable)  # what asyncssh itself refuses (e.g. a bad from=)
        except ValueError as exc:
            log.warning("authorized_keys of %s: line %d skipped: %s", username, number, exc)
            continue
        lines.append(usable)
    if not lines:
        log.warning("authorized_keys of %s has no usable key: key login is off for this user", username)
        return None
    return asyncssh.SSHAuthorizedKeys("\n".join(lines))


def _authorized_keys_of(username: str) -> asyncssh.SSHAuthorizedKeys | None:
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        return None
    text = read_authorized_keys(entry)
    return parse_authorized_keys(text, entry.pw_name) if text else None


# -- channels -------------------------------------------------------------------------------------


def _say(process: asyncssh.SSHServerProcess, text: str) -> None:
    """One line on the channel's stderr (the person's terminal, not the program's output)."""
    end = "\r\n" if process.term_type else "\n"
    try:
        process.stderr.write(f"termbridge: {text}{end}".encode())
    except OSError:
        pass  # the channel is already closing


def _refuse(process: asyncssh.SSHServerProcess, text: str, status: int = 1) -> None:
    _say(process, text)
    process.exit(status)


class _ChannelProcess(asyncssh.SSHServerProcess):
    """One channel a client opened. asyncssh would serve "sftp" itself (given an sftp_factory) or
    refuse it; here sftp is the container's sshd's to serve, like a shell or a command."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler, None, 0, False)

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        start_as_process(self)


def start_as_process(process: asyncssh.SSHServerProcess) -> None:
    """Run `process`'s handler on its channel, as asyncssh does for a shell or a command, whatever
    the request (sftp included). asyncssh has no public call for this (its own session_started
    hands "sftp" to its built-in SFTP server), so this is the one place that uses a private one:
    `SSHServerProcess._start_process(stdin, stdout, stderr)`. tests/test_ssh_front.py checks that
    asyncssh still has it, so an upgrade that changes it fails there, not in production."""
    chan = process.channel
    handler = process._start_process(  # noqa: SLF001 - see the docstring
        asyncssh.SSHReader(process, chan),
        asyncssh.SSHWriter(process, chan),
        asyncssh.SSHWriter(process, chan, asyncssh.EXTENDED_DATA_STDERR),
    )
    chan.get_connection().create_task(handler)


# -- one connection -------------------------------------------------------------------------------


class SshConnection(asyncssh.SSHServer):
    """One client connection: its authentication, its session and its channels. It is also the
    session's Sink: the manager tells it about idle warnings and the end."""

    def __init__(self, door: SshDoor) -> None:
        self._door = door
        self._conn: asyncssh.SSHServerConnection | None = None
        self.rhost = "-"
        self.user: AuthenticatedUser | None = None
        self.session: Session | None = None
        self._key_user: AuthenticatedUser | None = None
        self._failures = 0
        self._password_check: asyncio.Task[AuthResult] | None = None
        self._env_budget = _EnvBudget()
        self._starting: asyncio.Task[Session] | None = None
        self._channels: set[asyncssh.SSHServerProcess] = set()
        self._linger: asyncio.TimerHandle | None = None
        self._last_command: dict[str, Any] | None = None  # the shell or exec channel that ended last

    # -- connection -----------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.rhost = str(peer[0]) if peer else "-"
        self._door.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._door.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        self._door.spawn(self._release(exc))

    async def _release(self, exc: Exception | None) -> None:
        """The client went away: a start in progress is cancelled (leaving nothing behind), a
        running session ends as `disconnected`."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        session = self.session
        if session is not None and not session.ending:
            session.log.info("ssh connection from %s closed%s", self.rhost, f": {exc}" if exc else "")
            last = self._last_command
            running = any(c["ended"] == "open" and c["kind"] in COMMAND_KINDS for c in session.channels)
            if last is not None and last["ended"] == "exit" and not running:
                # The client went after the last of its commands or shells ended: that end is the session's.
                session.exit_signal = last["signal"]
                await self._door.manager.end(session, EndReason.EXIT, code=last["code"])
            else:
                await self._door.manager.end(session, EndReason.DISCONNECTED)

    def close(self, reason: str = "") -> None:
        if self._conn is not None and not self._conn.is_closed():
            if reason:
                self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)
            else:
                self._conn.close()

    # -- authentication -------------------------------------------------------------------------

    async def begin_auth(self, username: str) -> bool:  # type: ignore[override]
        """Load the keys this user may log in with, if the account may log in at all."""
        self._key_user = None
        keys = await self._door.authorized_keys(username, self.rhost)
        if self._conn is None:
            raise RuntimeError("authentication before the connection was made")
        if keys is not None:
            self._key_user, authorized = keys
            self._conn.set_authorized_keys(authorized)
        else:
            self._conn.set_authorized_keys(None)  # type: ignore[arg-type]
        return True

    def public_key_auth_supported(self) -> bool:
        return True  # offered for every name, so the method list does not tell who has keys

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:  # type: ignore[override]
        """asyncssh cancels this when the client sends another request or goes away; the check
        itself is the door's (see `SshDoor.check_password`) and goes on to its verdict, which is
        counted, throttled and audited whatever the client does. One check per connection at a
        time: a client that gives up early waits for its previous guess before the next is heard."""
        if self._password_check is not None:
            await asyncio.wait({self._password_check})
        if self._failures >= MAX_PASSWORD_TRIES:
            raise asyncssh.PermissionDenied("too many authentication failures")
        check = self._password_check = self._door.check_password(username, password, self.rhost)
        check.add_done_callback(self._count_failure)
        result = await asyncio.shield(check)
        if result.outcome is Outcome.UNAVAILABLE:
            raise asyncssh.ServiceNotAvailable(AuthUnavailable.user_message)
        if result.outcome is Outcome.THROTTLED:
            raise asyncssh.PermissionDenied(f"too many failed logins; try again in {result.retry_after} s")
        if result.ok:
            self.user = result.user
            return True
        if self._failures >= MAX_PASSWORD_TRIES:
            log.warning("ssh connection from %s closed after %d failed passwords", self.rhost, self._failures)
            raise asyncssh.PermissionDenied("too many authentication failures")
        return False

    def _count_failure(self, check: asyncio.Task[AuthResult]) -> None:
        if not check.cancelled() and check.exception() is None and check.result().outcome is Outcome.DENIED:
            self._failures += 1

    def auth_completed(self) -> None:
        """asyncssh says the client is in; only a user our own checks vouched for, under the name
        the client logged in with, gets a session (an explicit check: `python -O` drops asserts)."""
        user = self.user or self._key_user
        name = self._conn.get_extra_info("username") if self._conn is not None else None
        if user is None or user.name != name:
            log.error("ssh connection from %s authenticated without the gateway's check; closed", self.rhost)
            self.close("authentication failed")
            return
        if self.user is None:
            name = printable_username(user.name)
            self._door.manager.note_login(name, self.rhost, Door.SSH, LoginResult.OK, "public key")
        self.user = user
        log.info("ssh login of %s from %s", user.name, self.rhost)
        self._starting = asyncio.get_running_loop().create_task(self._start(user), name=f"ssh-start-{user.name}")

    async def _start(self, user: AuthenticatedUser) -> Session:
        try:
            return await self._door.manager.create(user, Door.SSH, self)
        except BridgeError as exc:
            log.warning("ssh session of %s from %s not started: %s", user.name, self.rhost, exc.detail)
            if not self._channels:
                self._linger = asyncio.get_running_loop().call_later(
                    FAILED_START_LINGER, self._close_unheard, exc.user_message
                )
            raise

    def _close_unheard(self, reason: str) -> None:
        if not self._channels:
            self.close(reason)

    # -- the Sink protocol ----------------------------------------------------------------------

    async def started(self, session: Session) -> None:
        self.session = session

    async def idle_warning(self, seconds: float) -> None:
        for process in list(self._channels):
            if process.term_type or (process.command is None and process.subsystem is None):
                _say(process, f"this session ends in {round(seconds)} s unless you type something")

    async def ended(self, code: int | None, reason: EndReason, message: str | None) -> None:
        """Each channel hears why and exits with 255 (what ssh reports for a lost connection), so
        that clients print the line before they go; the connection closes once they did."""
        text = message or f"the session ended ({reason})"
        channels = list(self._channels)
        for process in channels:
            _refuse(process, text, status=255)
        self._door.spawn(self._close_after(channels, text))

    async def _close_after(self, channels: list[asyncssh.SSHServerProcess], reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await asyncio.gather(*(process.wait_closed() for process in channels), return_exceptions=True)
        except TimeoutError:
            pass
        self.close(reason)

    # -- channels -------------------------------------------------------------------------------

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel, asyncssh.SSHServerSession]:
        if self._conn is None:
            raise RuntimeError("a channel before the connection was made")
        channel = self._conn.create_server_channel()
        channel.__class__ = _EnvCappedChannel  # asyncssh makes the channel; only env handling differs
        channel.env_budget = self._env_budget
        return channel, _ChannelProcess(self._serve_channel)

    async def _serve_channel(self, process: asyncssh.SSHServerProcess) -> None:
        """The boundary for one channel: whatever goes wrong is logged with the session and user
        and ends this channel with a line on stderr; the connection and its other channels go on."""
        self._channels.add(process)
        session: Session | None = None
        try:
            if self._starting is None:
                raise RuntimeError("a channel before authentication completed")
            try:
                session = await asyncio.shield(self._starting)
            except BridgeError as exc:
                _refuse(process, exc.user_message)
                return
            if session.ending:
                _refuse(process, "this session has ended")
                return
            await self._bridge(session, process)
        except Exception:
            (session.log if session is not None else log).exception("channel from %s failed", self.rhost)
            _refuse(process, "internal error; the gateway's log has the details", status=255)
        finally:
            self._channels.discard(process)

    async def _bridge(self, session: Session, process: asyncssh.SSHServerProcess) -> None:
        """Open the same request in the container and join the two channels until one closes."""
        if session.upstream is None:
            raise RuntimeError("a started session without an upstream connection")
        env = {name: value for name, value in process.env.items() if _env_passes(name)}
        try:
            upstream = await session.upstream.open_channel(
                session,
                command=process.command,
                subsystem=process.subsystem,
                env=env,
                term_type=process.term_type,
                term_size=process.term_size,
                term_modes=process.term_modes,
            )
        except OSError as exc:
            session.log.warning("the container refused a channel: %r", exc)
            _refuse(process, "the container could not run this request")
            return
        what = process.subsystem or ("exec" if process.command is not None else "shell")
        session.log.info("channel opened: %s%s", what, " with pty" if process.term_type else "")
        record: dict[str, Any] = {"kind": what, "ended": "open", "code": None, "signal": None}
        session.channels.append(record)
        del session.channels[:-MAX_CHANNEL_RECORDS]  # a client may open thousands on one connection
        await process.redirect(stdin=upstream.stdin)
        # The client's EOF comes with the exit status (as from sshd, status first): OpenSSH's
        # multiplexing master drops a status that arrives after EOF.
        await process.redirect(stdout=upstream.stdout, stderr=upstream.stderr, send_eof=False)
        theirs = asyncio.ensure_future(upstream.wait_closed())
        ours = asyncio.ensure_future(process.wait_closed())
        try:
            done, _ = await asyncio.wait({theirs, ours}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            theirs.cancel()
            ours.cancel()
        # Recorded before the client hears the status, so that its disconnect finds it.
        if theirs not in done:  # the person closed the channel first
            record["ended"] = "closed"
            upstream.close()
        elif upstream.exit_signal:
            record.update(ended="exit", signal=upstream.exit_signal[0])
            process.exit_with_signal(*upstream.exit_signal)
        elif upstream.exit_status is not None and upstream.exit_status >= 0:
            record.update(ended="exit", code=upstream.exit_status)
            process.exit(upstream.exit_status)
        else:
            record["ended"] = "lost"
            if not session.ending:
                _say(process, "the connection to your container was lost")
                process.exit(255)
        if what in COMMAND_KINDS:
            self._last_command = record
        session.log.info("channel closed: %s, %s, code %s, signal %s", what, record["ended"], record["code"],
                         record["signal"])


# -- the listener ---------------------------------------------------------------------------------


class SshDoor:
    """The SSH listener and every connection it accepted."""

    def __init__(self, config: Config, manager: SessionManager, authenticator: ThrottledAuthenticator) -> None:
        self.config = config
        self.manager = manager
        self.authenticator = authenticator
        self.connections: set[SshConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acceptor: asyncssh.SSHAcceptor | None = None

    async def start(self) -> None:
        if self.config.ssh.listen is None:
            raise ConfigError("'ssh.listen' is not set")
        host, port = self.config.ssh.listen
        host_key = await asyncio.to_thread(load_or_create_host_key, self.config.ssh_host_key)
        logging.getLogger("asyncssh").addFilter(_HIDE_TYPED_NAMES)  # once: a filter is added only once
        try:
            self._acceptor = await asyncssh.listen(
                host,
                port,
                server_factory=partial(SshConnection, self),
                server_host_keys=[host_key],
                server_version="termbridge",
                config=None,
                encoding=None,
                line_editor=False,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                keepalive_interval=30,
                keepalive_count_max=3,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(f"'ssh.listen' {host}:{port} cannot be used: {exc.strerror or exc}") from None
        addresses = ", ".join(f"{a[0]}:{a[1]}" for a in self._acceptor.get_addresses())
        log.info("SSH door listening on %s, host key %s", addresses, host_key.get_fingerprint())

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("the SSH door is not listening")
        return self._acceptor.get_port()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run work the door owns, that no connection may cancel (it waits for it on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def check_password(self, username: str, password: str, rhost: str) -> asyncio.Task[AuthResult]:
        """One password check as a task of the door, not of the connection: a client that gives
        up or disconnects cannot stop it from being counted by the throttle and audited."""
        return self.spawn(self._check_password(username, password, rhost))

    async def _check_password(self, username: str, password: str, rhost: str) -> AuthResult:
        result = await self.authenticator.authenticate(username, password, rhost)
        self.manager.note_login(printable_username(username), rhost, Door.SSH, result.outcome, result.reason)
        return result

    async def authorized_keys(
        self, username: str, rhost: str
    ) -> tuple[AuthenticatedUser, asyncssh.SSHAuthorizedKeys] | None:
        """The user and their keys, when the account may log in with a key and has safe keys."""
        if not valid_username(username):
            return None
        keys = await asyncio.to_thread(_authorized_keys_of, username)  # NSS and file reads may block
        if keys is None:
            return None
        result = await self.authenticator.authorize_key(username, rhost)
        if not result.ok or result.user is None:
            return None
        return result.user, keys

    def stop_listening(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()

    async def close(self) -> None:
        """Stop listening, let ended sessions say goodbye (CLOSE_GRACE), drop what is left."""
        self.stop_listening()
        await self._drain()
        for connection in list(self.connections):
            connection.close("the gateway is shutting down")
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
        await self._drain()

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
