"""The gateway's SSH client to one session container's sshd.

Each session gets its own client key and its own host key; the host key is pinned, so the
gateway talks to exactly the sshd it provisioned (no trust on first use, nothing else accepted).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import asyncssh

from .backend import Container
from .errors import SessionStartError

log = logging.getLogger("termbridge.upstream")

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

    @property
    def authorized_keys(self) -> bytes:
        return self.client_key.export_public_key("openssh")

    @property
    def host_private_key(self) -> bytes:
        return self.host_key.export_private_key("openssh")

    @property
    def host_public_key(self) -> bytes:
        return self.host_key.export_public_key("openssh")


@dataclass(frozen=True)
class HeldTerminal:
    """An attachment to the session holder's shell."""

    process: asyncssh.SSHClientProcess
    offset: int  # absolute offset of the first output byte after the header
    lost: int  # bytes between the requested offset and `offset` that the holder no longer has
    new_shell: bool  # this attach started the shell
    rest: bytes  # output that came with the header

    def write(self, data: bytes) -> None:
        """Keystrokes for the shell."""
        for i in range(0, len(data), FRAME_MAX):
            chunk = data[i : i + FRAME_MAX]
            self.process.stdin.write(b"d" + len(chunk).to_bytes(2, "big") + chunk)

    def resize(self, cols: int, rows: int) -> None:
        """This attachment's window size (the last one to resize or type sets the shell's)."""
        size = _clamp(rows).to_bytes(2, "big") + _clamp(cols).to_bytes(2, "big")
        self.process.stdin.write(b"w\x00\x04" + size)


def _clamp(n: int) -> int:
    return max(1, min(SIZE_MAX, int(n)))


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

    async def open_terminal(
        self, term: str, cols: int, rows: int, env: Mapping[str, str] | None = None
    ) -> asyncssh.SSHClientProcess:
        """A login shell on a pty; bytes in, bytes out."""
        return await self.conn.create_process(
            term_type=term,
            term_size=(cols, rows),
            env=dict(env or {}),
            encoding=None,
        )

    async def attach_held(
        self, term: str, cols: int, rows: int, offset: int = 0, env: Mapping[str, str] | None = None,
        repaint: bool = False,
    ) -> HeldTerminal:
        """The session's shell through the holder (started on the first attach): output from
        `offset` on (or from the oldest byte kept), a repaint of full-screen programs if asked.
        No pty on this channel (no second terminal on the byte path): input and window changes go
        through `HeldTerminal.write` and `resize`. The process exits with the shell's exit
        status; killed by SIGUSR1 when it fell more than the holder's buffer behind (attach again
        from the offset reached)."""
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
        return HeldTerminal(process, int(match[1]), int(match[2]), match[3] == b"new", data[match.end():])

    def close(self) -> None:
        self.conn.close()

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()
