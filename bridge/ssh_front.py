"""The SSH door: plain ssh, sftp and scp clients get a fresh container per connection.

The gateway is an asyncssh server. Once PAM (or a key from the host user's authorized_keys)
vouches for the person, the connection gets one session from the session manager: a container
and an SSH connection into its sshd. Every channel the client opens (shell, exec, the sftp
subsystem) is opened again on that upstream connection and joined to it with
`SSHServerProcess.redirect()`, which carries data, EOF, window-change, break and signals; the exit
status or exit signal goes back to the client. Only sessions are served: TCP, agent and X11
forwarding are refused.

`ssh alice+NAME@host` asks for the profile NAME: everything about the login (PAM, keys, the
throttle, the audit trail) uses the account name `alice`; the profile is checked against her
groups once she is in, and a bad or forbidden name ends the connection with one line saying why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any, TypeVar

import asyncssh

from .auth import AuthenticatedUser, AuthResult, Outcome, member_of, printable_username, valid_username
from .config import Config, ProfileConfig
from .errors import AuthUnavailable, BridgeError, ConfigError, StoreUnavailable
from .fleet import format_sessions
from .profiles import choose
from .session import Session, TerminalRequest, Viewer
from .sessions import SessionManager
from .ssh_attach import AttachSink, parse_attach, pump_input, serve_attach
from .ssh_channels import ChannelProcess, EnvBudget, EnvCappedChannel, env_passes, refuse, say
from .ssh_keys import authorized_keys_of, load_or_create_host_key
from .throttle import ThrottledAuthenticator
from .vocab import Door, EndReason, LoginResult

log = logging.getLogger("termbridge.ssh")
T = TypeVar("T")

# OpenSSH clients try a password 3 times, then keyboard-interactive (which asyncssh also serves
# from the password check) 3 more: the connection ends after the third wrong answer overall.
MAX_PASSWORD_TRIES = 3
# A connection whose session could not start and that opened no channel to hear why (ssh -N)
# is closed after this long, with the reason as the disconnect message.
FAILED_START_LINGER = 5.0
# After a session ended, how long its channels have to say goodbye before the connection closes.
CLOSE_GRACE = 2.0
# The audit trail keeps how the last this many channels of a connection ended.
MAX_CHANNEL_RECORDS = 64
COMMAND_KINDS = ("shell", "exec")
# `ssh admin@host sessions`: the fleet's session list for members of auth.admin_groups, answered
# by the gateway itself (an admin's connection starts no container for it).
SESSIONS_COMMAND = "sessions"
NOT_AN_ADMIN = "`sessions` lists every session for members of the gateway's admin groups (auth.admin_groups) only"


PROFILE_SEPARATOR = "+"  # `alice+NAME`: no account name has one (auth.valid_username)


def split_login(name: str) -> tuple[str, str | None]:
    """The name an SSH client sent, as (account name, profile asked for or None)."""
    account, separator, profile = name.partition(PROFILE_SEPARATOR)
    return account, (profile if separator else None)


def _printable_login(name: str) -> str:
    """`printable_username` of the account; of a profile suffix only its length (a password typed
    into the name field could follow a real account name and a "+")."""
    account, profile = split_login(name)
    shown = printable_username(account)
    return shown if profile is None else f"{shown}{PROFILE_SEPARATOR}<{len(profile)} chars>"


class _HideTypedNames(logging.Filter):
    """asyncssh logs the user name a client sent ("Beginning auth for user %s"), and people type
    their password there: such a name is logged as `printable_username` shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "user %s" in str(record.msg) and isinstance(record.args, tuple):
            record.args = tuple(_printable_login(a) if isinstance(a, str) else a for a in record.args)
        return True


_HIDE_TYPED_NAMES = _HideTypedNames()


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
        self._profile: str | None = None  # asked for with `alice+NAME`
        self._failures = 0
        self._password_check: asyncio.Task[AuthResult] | None = None
        self._env_budget = EnvBudget()
        self._starting: asyncio.Task[Session] | None = None
        self._channels: set[asyncssh.SSHServerProcess] = set()
        self._linger: asyncio.TimerHandle | None = None
        self._last_command: dict[str, Any] | None = None  # the shell or exec channel that ended last
        # An admin's container starts with the first channel that needs one (not `sessions`).
        self._container_wanted = asyncio.Event()
        self._attached = False  # an `attach` channel: the connection runs no session of its own
        self._shell: AttachSink | None = None  # the interactive shell, through the session holder
        self._shell_record: dict[str, Any] = {}  # and how it ended, for the audit trail

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
        if session is not None and not session.ending and session.sink is not self:
            session.log.info("ssh connection from %s closed; the session runs on, attached elsewhere", self.rhost)
            return
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
        username, self._profile = split_login(username)
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
        username = split_login(username)[0]
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
        if user is None or name is None or user.name != split_login(name)[0]:
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
            if await member_of(user.name, self._door.config.auth.admin_groups):
                await self._container_wanted.wait()
            profile = await self._door.profile_for(user, self._profile)
            return await self._door.manager.create(user, Door.SSH, self, profile=profile)
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
                say(process, f"this session ends in {round(seconds)} s unless you type something")

    async def ended(self, code: int | None, reason: EndReason, message: str | None) -> None:
        """Each channel hears why and exits with 255 (what ssh reports for a lost connection), so
        that clients print the line before they go; the connection closes once they did. The
        interactive shell that exited passes on its exit status (or signal) instead."""
        text = message or f"the session ended ({reason})"
        channels = list(self._channels)
        shell = self._shell.process if self._shell is not None else None
        for process in channels:
            if process is shell and reason == EndReason.EXIT and self._shell is not None:
                self._shell.done = True
                signal = self.session.exit_signal if self.session is not None else None
                self._shell_record.update(ended="exit", code=code, signal=signal)
                if signal:
                    process.exit_with_signal(signal)
                else:
                    process.exit(code if code is not None else 255)
            else:
                refuse(process, text, status=255)
        self._door.spawn(self._close_after(channels, text))

    async def viewers(self, viewers: list[Viewer]) -> None:
        if self._shell is not None and not self._shell.done:
            await self._shell.viewers(viewers)

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
        channel.__class__ = EnvCappedChannel  # asyncssh makes the channel; only env handling differs
        channel.env_budget = self._env_budget
        return channel, ChannelProcess(self._serve_channel)

    async def _serve_channel(self, process: asyncssh.SSHServerProcess) -> None:
        """The boundary for one channel: whatever goes wrong is logged with the session and user
        and ends this channel with a line on stderr; the connection and its other channels go on."""
        self._channels.add(process)
        session: Session | None = None
        try:
            if self._starting is None or self.user is None:
                raise RuntimeError("a channel before authentication completed")
            if process.command is not None and process.command.strip() == SESSIONS_COMMAND:
                await self._list_sessions(process, self.user)
                return
            attach = parse_attach(process.command) if process.subsystem is None else None
            if attach is not None or self._attached:
                await self._attach(process, attach)
                return
            self._container_wanted.set()
            try:
                session = await asyncio.shield(self._starting)
            except BridgeError as exc:
                refuse(process, exc.user_message)
                return
            if session.ending:
                refuse(process, "this session has ended")
                return
            await self._bridge(session, process)
        except Exception:
            (session.log if session is not None else log).exception("channel from %s failed", self.rhost)
            refuse(process, "internal error; the gateway's log has the details", status=255)
        finally:
            self._channels.discard(process)

    async def _list_sessions(self, process: asyncssh.SSHServerProcess, user: AuthenticatedUser) -> None:
        """`sessions`: what `termbridge sessions list` prints, for admins (asked at this moment);
        a one-line refusal for anyone else."""
        manager = self._door.manager
        if not await member_of(user.name, self._door.config.auth.admin_groups):
            log.warning("ssh `sessions` of %s from %s refused: not in auth.admin_groups", user.name, self.rhost)
            refuse(process, NOT_AN_ADMIN)
            return
        try:
            rows = await manager.fleet_view()
        except StoreUnavailable as exc:
            log.error("ssh `sessions` of %s: %s", user.name, exc.detail)
            refuse(process, exc.user_message)
            return
        manager.observers.admin_viewed(user.name, self.rhost, Door.SSH, "sessions")
        end = "\r\n" if process.term_type else "\n"
        process.stdout.write(end.join(format_sessions(rows)).encode() + end.encode())
        process.exit(0)

    async def _attach(self, process: asyncssh.SSHServerProcess, args: list[str] | None) -> None:
        """`attach [ID]` as the connection's first channel: the connection's own session is not
        needed (its start is cancelled, leaving nothing behind) and this channel attaches to
        one of the person's live sessions. Any other channel of such a connection is refused."""
        if args is None or (self._attached or len(self._channels) > 1):
            refuse(process, "an attach connection runs nothing else; open another connection")
            return
        self._attached = True
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        elif self.session is not None and not self.session.ending:
            await self._door.manager.end(self.session, EndReason.EXIT, message="not needed: attached elsewhere")
        if self.user is not None:
            await serve_attach(self._door.manager, self.user, process, args)

    async def _held_shell(self, session: Session, process: asyncssh.SSHServerProcess) -> None:
        """The connection's first interactive shell runs under the session holder, as a web
        terminal's does: the page (`/ws?session=ID`) or `ssh ... attach` may take it over, admins
        may watch it. The session's id is in the audit trail and `termbridge sessions list`."""
        cols, rows = process.term_size[:2] if process.term_size else (80, 24)
        env = {name: value for name, value in process.env.items() if env_passes(name)}
        terminal = TerminalRequest(process.term_type or "xterm", cols or 80, rows or 24, env)
        sink = self._shell = AttachSink(process)
        await sink.started(session)
        record = self._shell_record = {"kind": "shell", "ended": "open", "code": None, "signal": None}
        session.channels.append(record)
        try:
            await self._door.manager.open_shell(session, sink, terminal)
        except BridgeError as exc:
            session.log.warning("the held shell did not open: %s", exc.detail)
            record["ended"] = "lost"
            refuse(process, "the container could not start a shell", status=255)
            return
        session.log.info("channel opened: shell with pty, through the session holder")
        try:
            await pump_input(session, sink, process)
        finally:
            self._door.manager.detach(session, sink)
            if record["ended"] == "open":
                record["ended"] = "closed"
            self._last_command = record
            if not sink.done and not session.ending:
                sink.done = True
                process.exit(0)

    async def _bridge(self, session: Session, process: asyncssh.SSHServerProcess) -> None:
        """Open the same request in the container and join the two channels until one closes."""
        if session.upstream is None:
            raise RuntimeError("a started session without an upstream connection")
        if process.term_type and process.command is None and process.subsystem is None and session.stream is None:
            await self._held_shell(session, process)
            return
        env = {name: value for name, value in process.env.items() if env_passes(name)}
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
            refuse(process, "the container could not run this request")
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
                say(process, "the connection to your container was lost")
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

    async def profile_for(self, user: AuthenticatedUser, requested: str | None) -> ProfileConfig:
        """The profile of `user`'s connection: `requested` (`alice+NAME`) if it is theirs, else
        their remembered, only or first one (profiles.py). Raises ProfileRefused."""
        config = self.manager.config
        remembered = None
        if requested is None and len(config.profiles) > 1 and self.manager.store is not None:
            try:
                remembered = await self.manager.store.get_profile_choice(user.name)
            except StoreUnavailable as exc:
                log.warning("profile choice of %s not read: %s", user.name, exc.detail)
        return await choose(config, user.name, requested, remembered)

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
        keys = await asyncio.to_thread(authorized_keys_of, username)  # NSS and file reads may block
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
