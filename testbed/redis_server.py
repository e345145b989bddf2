"""A real redis-server (Debian's) on a free loopback port, for tests of the Redis store and of
gateways sharing one. No persistence: the data dir is a temporary directory."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.gateway import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """Start, stop and restart (same port) one redis-server process."""

    def __init__(self, *extra: str) -> None:
        """`extra`: more redis-server options, e.g. "--requirepass", "pw"."""
        self.port = free_port()
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="tb-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--rdbcompression", "no", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), *self.extra],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.command("PING") not in ("+PONG", "-NOAUTH Authentication required."):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def command(self, *words: str) -> str | None:
        """One inline command; the first line of the reply, or None if nothing listens."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall((" ".join(words) + "\r\n").encode())
                return sock.makefile("rb").readline().decode().strip()
        except OSError:
            return None

    def dump(self) -> bytes:
        """Everything the server holds, as an RDB snapshot would write it to disk."""
        assert self.command("SAVE") == "+OK"
        return (self.dir / "dump.rdb").read_bytes()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
