"""Terminal clients with one shape, so every measurement runs the same code against every system:
termbridge's web door (WebSocket, its /ws protocol), any SSH server with a pty (termbridge's SSH door,
or a container's own sshd), a Docker attach socket, and ttyd's WebSocket protocol.

A client only sends bytes and hands back output chunks; `Reader` does the waiting, keeping a
short window so that scanning 50 MB for a marker stays linear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from typing import Any, Protocol

import aiohttp
import asyncssh

from bridge.upstream import HeldShell

from .harness import PROMPT

WINDOW = 4096


class Term(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes:
        """The next chunk of output; b"" once the connection closed."""

    async def close(self) -> None: ...


class Reader:
    """Waits on a Term's output: a regex over the recent window, counting every byte."""

    def __init__(self, term: Term) -> None:
        self.term = term
        self.window = b""
        self.total = 0

    def forget(self) -> None:
        """Only output after this point can match."""
        self.window = b""

    async def until(self, pattern: bytes | re.Pattern[bytes], timeout: float = 30.0) -> None:
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        async with asyncio.timeout(timeout):
            while True:
                match = regex.search(self.window)
                if match:
                    self.window = self.window[match.end():]
                    return
                chunk = await self.term.recv()
                if not chunk:
                    raise ConnectionError(f"closed while waiting for {regex.pattern!r}; last output {self.window[-200:]!r}")
                self.total += len(chunk)
                self.window = (self.window + chunk)[-WINDOW:]

    async def until_closed(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while await self.term.recv():
                pass


class _WebSocketTerm:
    """A WebSocket read all the time in the background, as a browser does: pings are answered
    even while nobody waits for output (an idle session's socket must survive the heartbeat)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    def _decode(self, msg: aiohttp.WSMessage) -> bytes | None:
        """Terminal bytes from one message, or None when it carries none."""
        raise NotImplementedError

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                data = self._decode(msg)
                if data:
                    self._chunks.put_nowait(data)
        finally:
            self._chunks.put_nowait(b"")

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self) -> bytes:
        chunk = await self._chunks.get()
        if not chunk:
            self._chunks.put_nowait(b"")  # closed stays closed
        return chunk

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


class WebTerm(_WebSocketTerm):
    """termbridge's web door: binary frames are terminal bytes, text frames are JSON control."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.controls: list[dict[str, Any]] = []
        super().__init__(ws)

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, origin: str, cols: int = 80, rows: int = 24) -> WebTerm:
        ws = await http.ws_connect("/ws", headers={"Origin": origin}, max_msg_size=0)
        await ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
        return cls(ws)

    def _decode(self, msg: aiohttp.WSMessage) -> bytes | None:
        if msg.type == aiohttp.WSMsgType.BINARY:
            return msg.data
        if msg.type == aiohttp.WSMsgType.TEXT:
            self.controls.append(json.loads(msg.data))
        return None

    def control(self, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.controls if c.get("type") == kind), None)


class SshTerm:
    """A pty session over SSH (the SSH door, or straight into a container's sshd)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, process: asyncssh.SSHClientProcess) -> None:
        self.conn = conn
        self.process = process

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection, cols: int = 80, rows: int = 24) -> SshTerm:
        process = await conn.create_process(term_type="xterm-256color", term_size=(cols, rows), encoding=None)
        return cls(conn, process)

    async def send(self, data: bytes) -> None:
        self.process.stdin.write(data)

    async def recv(self) -> bytes:
        return await self.process.stdout.read(65536)

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()


class OpenSshTerm:
    """OpenSSH's `ssh -tt` as the client (a subprocess; its stdin and stdout are the terminal):
    tells whether a number of the SSH door is the gateway's or the benchmark's own Python client's."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def open(cls, port: int, user: str, key_file: str, cols: int = 80, rows: int = 24) -> OpenSshTerm:
        proc = await asyncio.create_subprocess_exec(
            "ssh", "-tt", "-F", "/dev/null", "-i", key_file, "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"{user}@127.0.0.1", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={"TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows), "PATH": "/usr/bin:/bin"},
        )
        return cls(proc)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def recv(self) -> bytes:
        assert self.proc.stdout is not None
        return await self.proc.stdout.read(65536)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()


class HeldTerm(SshTerm):
    """The session holder's shell (`Upstream.attach_held`): keystrokes go in frames."""

    def __init__(self, conn: asyncssh.SSHClientConnection, shell: HeldShell) -> None:
        self.conn = conn
        self.shell = shell

    async def send(self, data: bytes) -> None:
        self.shell.write(data)

    async def recv(self) -> bytes:
        return await self.shell.read(65536)


class AttachTerm:
    """A Docker attach socket of a container started with a tty (raw bytes both ways)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def wrap(cls, sock: socket.socket) -> AttachTerm:
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        return await self.reader.read(65536)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


class TtydTerm(_WebSocketTerm):
    """ttyd 1.7's protocol: subprotocol `tty`; the first message is JSON with the size; then each
    message starts with a command byte ('0' input/output, '1' resize; '1' title and '2'
    preferences from the server)."""

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, url: str, cols: int = 80, rows: int = 24) -> TtydTerm:
        ws = await http.ws_connect(url + "/ws", protocols=("tty",), max_msg_size=0)
        await ws.send_bytes(json.dumps({"AuthToken": "", "columns": cols, "rows": rows}).encode())
        return cls(ws)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(b"0" + data)

    def _decode(self, msg: aiohttp.WSMessage) -> bytes | None:
        if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
            data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
            if data[:1] == b"0":
                return data[1:]
        return None


# -- measurements on any Term ----------------------------------------------------------------------

BACKSPACE_ECHO = re.compile(rb"\x08")


async def echo_round_trips(term: Term, reader: Reader, samples: int) -> list[float]:
    """Type one key at the prompt and time until its echo arrives; rub it out (untimed) and
    repeat, so the line never grows."""
    times = []
    for i in range(samples):
        key = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
        reader.forget()
        t0 = time.perf_counter()
        await term.send(key)
        await reader.until(key, timeout=10)
        times.append(time.perf_counter() - t0)
        reader.forget()
        await term.send(b"\x7f")
        await reader.until(BACKSPACE_ECHO, timeout=10)
    return times


async def throughput(term: Term, reader: Reader, megabytes: float) -> dict[str, float]:
    """Print `megabytes` MB of base64 (of random bytes) and time it until a marker that only the
    shell's arithmetic can produce (the echoed command line does not contain it)."""
    raw = int(megabytes * 1e6 * 3 / 4)
    reader.forget()
    start_total = reader.total
    t0 = time.perf_counter()
    await term.send(f"head -c {raw} /dev/urandom | base64; echo MARK$((6*7))DONE\r".encode())
    await reader.until(b"MARK42DONE", timeout=600)
    elapsed = time.perf_counter() - t0
    received = reader.total - start_total
    await reader.until(PROMPT, timeout=30)
    return {"bytes": received, "seconds": round(elapsed, 3), "mb_per_s": round(received / elapsed / 1e6, 2)}
