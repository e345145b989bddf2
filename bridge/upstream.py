"""The gateway's SSH client to one session container's sshd: the only asyncssh client code.

Each session gets its own client key and its own host key; the host key is pinned, so the
gateway talks to exactly the sshd it provisioned (no trust on first use, nothing else accepted).
Every channel the gateway opens in a container opens here: the web terminal's shell (`Shell`,
or `HeldShell` through the session holder), the SSH door's bridged channels (`open_channel`) and SFTP for the file endpoints
(`RemoteFiles`). asyncssh's errors stop here too: callers see `ConnectionError` and
`SftpFailure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import asyncssh

from .backends.base import Container
from .errors import SessionStartError

log = logging.getLogger("termbridge.upstream")
T = TypeVar("T")

# AES-GCM first: with AES-NI it costs the gateway (and the container's sshd, inside its CPU
# limit) far less per byte than asyncssh's default chacha20-poly1305. Measured with
# `python -m benchmarks`: keystroke echo -25 %, throughput +10-20 %.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")

# The session holder's attach client (session-image/holder/tb-holder.c): its first output is this
# header, an APC string that a terminal would ignore; then the shell's output from `offset` on.
HOLDER_HEADER = re.compile(rb"\x1b_tb-holder 1 offset=(\d+) lost=(\d+) shell=(new|running)\x1b\\")
HOLDER_HEADER_MAX = 128
# `--framed` input: [type][length, 2 bytes][payload]; 'd' keystrokes, 'w' rows and cols.
FRAME_MAX = 0xFFFF
SIZE_MAX = 9999


@dataclass(frozen=True)
class SessionKeys:
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey

    @classmethod
    def generate(cls) -> SessionKeys:
        return cls(
            client_key=asyncssh.generate_private_key("ssh-ed25519", comment="termbridge-session"),
            host_key=asyncssh.generate_private_key("ssh-ed25519", comment="termbridge-session-host"),
        )

    @classmethod
    def for_claim(cls, host_private_key: bytes) -> SessionKeys:
        """A client key of its own, with the session's host key pinned: what the Swarm backend
        logs in with to claim a pooled container (root, forced command `termbridge-claim`)."""
        return cls(
            client_key=asyncssh.generate_private_key("ssh-ed25519", comment="termbridge-claim"),
            host_key=asyncssh.import_private_key(host_private_key),
        )

    @property
    def authorized_keys(self) -> bytes:
        return self.client_key.export_public_key("openssh")

    @property
    def host_private_key(self) -> bytes:
        return self.host_key.export_private_key("openssh")

    @property
    def host_public_key(self) -> bytes:
        return self.host_key.export_public_key("openssh")


def _acknowledge_at_once(conn: asyncssh.SSHClientConnection) -> None:
    """Acknowledge what the container's sshd sends as soon as it is read. sshd sets TCP_NODELAY
    only on a connection with a pty, and the holder's channel has none: there Nagle's algorithm
    holds each small write (the holder's header after sshd's reply to the exec, the prompt after
    the header, a second piece of an echo) until the last one is acknowledged, and Linux delays
    that acknowledgement by up to 40 ms when the gateway has nothing to send back. Measured
    (`python -m benchmarks.claim`): the attach took ~50 ms for 7 ms of the container's CPU.
    TCP_QUICKACK is not sticky, so it is set again after every read; it sends the pending
    acknowledgement at once."""
    sock = conn.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None:
        return
    received = conn.data_received

    def data_received(data: bytes) -> None:
        received(data)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    conn.data_received = data_received  # type: ignore[method-assign]


class Upstream:
    """One authenticated SSH connection into a session container."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, container: Container, keys: SessionKeys, timeout: float) -> Upstream:
        """Connect as soon as sshd listens. Refused connections are retried until `timeout`;
        a host key other than the pinned one fails at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.005
        pinned = ([keys.host_key.convert_to_public()], [], [])
        while True:
            try:
                conn = await asyncssh.connect(
                    container.address,
                    container.port,
                    username=container.ssh_user,
                    client_keys=[keys.client_key],
                    known_hosts=pinned,
                    agent_path=None,
                    config=[],
                    preferred_auth="publickey",
                    encryption_algs=CIPHERS,
                    connect_timeout=max(0.5, deadline - loop.time()),
                    keepalive_interval=30,
                    keepalive_count_max=3,
                )
                _acknowledge_at_once(conn)
                return cls(conn)
            except (OSError, asyncssh.ConnectionLost) as exc:
                if loop.time() + delay >= deadline:
                    raise SessionStartError(detail=f"sshd at {container.address} not reachable: {exc!r}") from exc
            except asyncssh.Error as exc:
                if isinstance(exc, asyncssh.DisconnectError) and "banner" in str(exc).lower():
                    continue
                raise SessionStartError(detail=f"ssh to {container.address} failed: {exc!r}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    @classmethod
    async def run_once(cls, container: Container, keys: SessionKeys, command: str, timeout: float) -> tuple[int | None, str]:
        """One command on a connection of its own: its exit status and output."""
        upstream = await cls.connect(container, keys, timeout)
        try:
            result = await upstream.conn.run(command, check=False)
            return result.exit_status, f"{result.stdout or ''}{result.stderr or ''}"
        finally:
            upstream.close()
            await upstream.wait_closed()

    async def open_terminal(self, term: str, cols: int, rows: int, env: Mapping[str, str] | None = None) -> Shell:
        """A login shell on a pty; bytes in, bytes out."""
        process = await self.conn.create_process(
            term_type=term,
            term_size=(cols, rows),
            env=dict(env or {}),
            encoding=None,
        )
        return Shell(process)

    async def attach_held(
        self, term: str, cols: int, rows: int, offset: int = 0, env: Mapping[str, str] | None = None,
        repaint: bool = False,
    ) -> HeldShell:
        """The session's shell through the holder (started on the first attach), which outlives
        this connection: output from `offset` on (or from the oldest byte kept), a repaint of
        full-screen programs if asked. No pty on this channel (no second terminal on the byte
        path): keystrokes and sizes go in frames (`HeldShell.write`, `resize`)."""
        command = f"tb-holder attach --framed --size {_clamp(cols)}x{_clamp(rows)} --offset {int(offset)}"
        process = await self.conn.create_process(
            command + (" --repaint" if repaint else ""), env={**(env or {}), "TERM": term}, encoding=None
        )
        data = b""
        while True:
            chunk = await process.stdout.read(4096)
            data += chunk
            if match := HOLDER_HEADER.match(data):
                break
            if not chunk or len(data) > HOLDER_HEADER_MAX:
                process.close()
                await process.wait_closed()
                raise SessionStartError(detail=f"tb-holder attach failed ({process.exit_status}): {data[:300]!r}")
        return HeldShell(process, int(match[1]), int(match[2]), match[3] == b"new", data[match.end() :])

    async def open_channel(
        self,
        meter: Meter,
        *,
        command: str | None,
        subsystem: str | None,
        env: Mapping[str, str],
        term_type: str | None,
        term_size: tuple[int, int, int, int] | None,
        term_modes: Mapping[int, int],
    ) -> asyncssh.SSHClientProcess:
        """The same request a person made of the SSH door (shell, exec or subsystem), opened in
        the container; what crosses it is reported to `meter`. The SSH door joins it to the
        person's channel with `redirect()`. Raises ConnectionError when the container refuses."""
        try:
            _, process = await self.conn.create_session(
                partial(_MeteredProcess, meter),
                command,
                subsystem=subsystem,
                env=dict(env),
                term_type=term_type,
                term_size=term_size,
                term_modes=dict(term_modes),
                encoding=None,
            )
        except asyncssh.Error as exc:
            raise ConnectionError(repr(exc)) from exc
        return process

    @contextlib.asynccontextmanager
    async def open_files(self) -> AsyncIterator[RemoteFiles]:
        """A new sftp-server in the container, on this connection."""
        try:
            async with self.conn.start_sftp_client() as sftp:
                yield RemoteFiles(sftp)
        except asyncssh.SFTPError as exc:
            raise SftpFailure.of(exc) from exc
        except asyncssh.Error as exc:
            raise SftpFailure(Sftp.UNAVAILABLE, f"sftp: {exc!r}") from exc

    def close(self) -> None:
        self.conn.close()

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()


class Shell:
    """The login shell of a web session: bytes in, bytes out, with SSH flow control both ways."""

    def __init__(self, process: asyncssh.SSHClientProcess) -> None:
        self._process = process

    def write(self, data: bytes) -> bool:
        """Hand keystrokes to the channel. True when some are left unsent (the shell is not
        reading): await `drain()` before writing more."""
        self._process.stdin.write(data)
        return self._process.stdin.channel.get_write_buffer_size() > 0

    async def drain(self) -> None:
        await self._process.stdin.drain()

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of output; b"" once the shell closed its output."""
        try:
            return await self._process.stdout.read(limit)
        except asyncssh.Error as exc:
            raise ConnectionError(repr(exc)) from exc

    def resize(self, cols: int, rows: int) -> None:
        self._process.change_terminal_size(cols, rows)

    async def wait_exit(self) -> tuple[int | None, str | None]:
        """(exit status, signal name) once the shell's channel closed; (None, None) when it
        closed without either (the connection was lost)."""
        await self._process.wait_closed()
        status = self._process.exit_status
        signal = self._process.exit_signal
        return (status if status is not None and status >= 0 else None), (signal[0] if signal else None)


class HeldShell(Shell):
    """The session's shell through the session holder. `offset`: absolute offset of the first
    output byte `read` returns; `lost`: bytes before it that were asked for and are gone (a gap);
    `new_shell`: this attach started the shell. `wait_exit` gives the shell's exit status, or
    the signal USR1 when this attachment fell a whole buffer behind and was let go (attach again
    from the offset reached)."""

    def __init__(self, process: asyncssh.SSHClientProcess, offset: int, lost: int, new_shell: bool, rest: bytes) -> None:
        super().__init__(process)
        self.offset = offset
        self.lost = lost
        self.new_shell = new_shell
        self._rest = rest

    def write(self, data: bytes) -> bool:
        for i in range(0, len(data), FRAME_MAX):
            chunk = data[i : i + FRAME_MAX]
            self._process.stdin.write(b"d" + len(chunk).to_bytes(2, "big") + chunk)
        return self._process.stdin.channel.get_write_buffer_size() > 0

    async def read(self, limit: int) -> bytes:
        if self._rest:
            chunk, self._rest = self._rest[:limit], self._rest[limit:]
            return chunk
        return await super().read(limit)

    def resize(self, cols: int, rows: int) -> None:
        """This attachment's size (the last attachment to resize or type sets the shell's)."""
        self._process.stdin.write(b"w\x00\x04" + _clamp(rows).to_bytes(2, "big") + _clamp(cols).to_bytes(2, "big"))


def _clamp(n: int) -> int:
    return max(1, min(SIZE_MAX, int(n)))


class Meter(Protocol):
    """What watches a bridged channel's bytes: the session's activity and accounting."""

    def note_input(self, data: bytes) -> None: ...

    def note_output(self, data: bytes) -> None: ...

    def note_resize(self, cols: int, rows: int) -> None: ...

    def touch(self) -> None: ...


class _MeteredProcess(asyncssh.SSHClientProcess):
    """The container end of one bridged channel, reporting what crosses it: `feed_data` and
    `feed_exception` are what redirect() calls with the person's bytes and terminal changes,
    `data_received` is the container's output.

    Output is passed on in fewer, larger pieces: sshd sends a pty's output in packets of at most
    4 KiB (one pty read each), and every packet passed on alone costs the gateway an encryption
    and a send, and the person's client a decryption. The first packet of a turn of the event
    loop goes on at once (a keystroke's echo waits for nothing); the ones that came with it are
    joined and go on at the end of that turn."""

    def __init__(self, meter: Meter) -> None:
        super().__init__()
        self._meter = meter
        self._held: list[tuple[int | None, list[bytes]]] | None = None  # None: nothing passed on this turn

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._meter.note_output(data)
        if self._held is None:
            super().data_received(data, datatype)
            self._held = []
            asyncio.get_running_loop().call_soon(self._flush)
        elif self._held and self._held[-1][0] == datatype:
            self._held[-1][1].append(data)
        else:
            self._held.append((datatype, [data]))

    def _flush(self) -> None:
        held, self._held = self._held or [], None
        for datatype, chunks in held:
            super().data_received(b"".join(chunks), datatype)

    def eof_received(self) -> bool:
        self._flush()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        super().connection_lost(exc)

    def feed_data(self, data: bytes, datatype: int | None) -> None:
        self._meter.note_input(data)
        super().feed_data(data, datatype)

    def feed_exception(self, exc: Exception) -> None:
        if isinstance(exc, asyncssh.TerminalSizeChanged):
            self._meter.note_resize(exc.width, exc.height)
        else:  # break or signal: the person did something
            self._meter.touch()
        super().feed_exception(exc)


# -- SFTP -----------------------------------------------------------------------------------------


class Sftp(enum.StrEnum):
    """Why an SFTP request failed, in the few kinds the file endpoints tell apart."""

    NO_SUCH_FILE = "no such file"
    PERMISSION = "permission denied"
    NO_SPACE = "no space"
    UNSUPPORTED = "unsupported"
    FAILURE = "failure"
    UNAVAILABLE = "unavailable"  # no SFTP at all: the connection or the subsystem failed


class SftpFailure(Exception):
    """An SFTP request failed; `kind` says how, `detail` is for the log."""

    def __init__(self, kind: Sftp, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail

    @classmethod
    def of(cls, exc: asyncssh.SFTPError) -> SftpFailure:
        if isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath)):
            kind = Sftp.NO_SUCH_FILE
        elif isinstance(exc, asyncssh.SFTPPermissionDenied):
            kind = Sftp.PERMISSION
        elif isinstance(exc, (asyncssh.SFTPNoSpaceOnFilesystem, asyncssh.SFTPQuotaExceeded)):
            kind = Sftp.NO_SPACE
        elif isinstance(exc, asyncssh.SFTPOpUnsupported):
            kind = Sftp.UNSUPPORTED
        else:
            kind = Sftp.FAILURE
        return cls(kind, repr(exc))


class FileKind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"
    OTHER = "other"


_KINDS = {
    asyncssh.FILEXFER_TYPE_REGULAR: FileKind.FILE,
    asyncssh.FILEXFER_TYPE_DIRECTORY: FileKind.DIR,
    asyncssh.FILEXFER_TYPE_SYMLINK: FileKind.LINK,
}


@dataclass(frozen=True)
class FileAttrs:
    kind: FileKind
    size: int
    mtime: int | None

    @classmethod
    def of(cls, attrs: asyncssh.SFTPAttrs) -> FileAttrs:
        return cls(_KINDS.get(attrs.type, FileKind.OTHER), attrs.size or 0, attrs.mtime)


async def _sftp(call: Awaitable[T]) -> T:
    try:
        return await call
    except asyncssh.SFTPError as exc:
        raise SftpFailure.of(exc) from exc
    except asyncssh.Error as exc:
        raise SftpFailure(Sftp.UNAVAILABLE, f"sftp: {exc!r}") from exc


class OpenFile:
    """One open file in the container; offsets are explicit."""

    def __init__(self, handle: asyncssh.SFTPClientFile) -> None:
        self._handle = handle

    async def read(self, size: int, offset: int) -> bytes:
        return await _sftp(self._handle.read(size, offset))

    async def write(self, data: bytes, offset: int) -> None:
        await _sftp(self._handle.write(data, offset))


class RemoteFiles:
    """The SFTP calls the file endpoints make, with asyncssh's errors as `SftpFailure`."""

    def __init__(self, sftp: asyncssh.SFTPClient) -> None:
        self._sftp = sftp

    async def realpath(self, path: str) -> str:
        return await _sftp(self._sftp.realpath(path))

    async def stat(self, path: str) -> FileAttrs:
        return FileAttrs.of(await _sftp(self._sftp.stat(path)))

    async def lstat(self, path: str) -> FileAttrs:
        return FileAttrs.of(await _sftp(self._sftp.lstat(path)))

    async def scandir(self, path: str) -> AsyncIterator[tuple[str, FileAttrs]]:
        """(name, attributes) of each entry, `.` and `..` included; names decoded leniently."""
        entries = self._sftp.scandir(path)
        while True:
            try:
                item = await _sftp(entries.__anext__())
            except StopAsyncIteration:
                return
            name = item.filename if isinstance(item.filename, str) else item.filename.decode(errors="replace")
            yield name, FileAttrs.of(item.attrs)

    async def free_space(self, path: str) -> int:
        vfs = await _sftp(self._sftp.statvfs(path))
        return vfs.bavail * vfs.frsize

    @contextlib.asynccontextmanager
    async def open(self, path: str, mode: str) -> AsyncIterator[OpenFile]:
        handle = await _sftp(self._sftp.open(path, mode))
        try:
            yield OpenFile(handle)
        finally:
            await _sftp(handle.close())

    async def remove(self, path: str) -> None:
        await _sftp(self._sftp.remove(path))

    async def replace(self, source: str, target: str) -> None:
        """Rename `source` over `target` (POSIX rename where the server has it)."""
        try:
            await _sftp(self._sftp.posix_rename(source, target))
        except SftpFailure as exc:
            if exc.kind is not Sftp.UNSUPPORTED:
                raise
            try:
                await self.remove(target)
            except SftpFailure as gone:
                if gone.kind is not Sftp.NO_SUCH_FILE:
                    raise
            await _sftp(self._sftp.rename(source, target))
