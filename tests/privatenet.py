"""A private network this test makes on this machine: a network namespace behind a veth pair in
10.213.x.0/30, with a TCP listener and a tiny DNS server in it. Traffic to it never leaves the
machine; it stands in for the server's LAN, cloud metadata and an internal name server."""

from __future__ import annotations

import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

# Answers A queries for *.tbtest with ANSWER, NXDOMAIN for anything else; accepts TCP on PORT.
SERVER = r"""
import socket, struct, sys, threading
port, answer = int(sys.argv[1]), sys.argv[2]

def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        q, peer = s.recvfrom(512)
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
            i += 1 + q[i]
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        question = q[12:i + 5]
        ours = labels[-1:] == ["tbtest"]
        if ours and qtype == 1:
            record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
            s.sendto(struct.pack(">HHHHHH", q[0] << 8 | q[1], 0x8180, 1, 1, 0, 0) + question + record, peer)
        else:
            s.sendto(struct.pack(">HHHHHH", q[0] << 8 | q[1], 0x8180 | (0 if ours else 3), 1, 0, 0, 0) + question, peer)

threading.Thread(target=dns, daemon=True).start()
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen()
print("ready", flush=True)
while True:
    c, peer = t.accept()
    print("tcp", peer[0], flush=True)
    c.close()
"""

PORT = 8765
ANSWER = "192.0.2.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class PrivateNet:
    def __init__(self, log_dir: Path) -> None:
        tag = secrets.token_hex(3)
        self.ns, self.host_if, self.peer_if = f"tbns{tag}", f"tbh{tag}", f"tbp{tag}"
        third = random.randrange(1, 255)
        self.network = f"10.213.{third}.0/30"
        self.host_address, self.address = f"10.213.{third}.1", f"10.213.{third}.2"
        self.log = log_dir / f"{self.ns}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrivateNet:
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            _ip("link", "set", self.peer_if, "netns", self.ns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.address}/30", "dev", self.peer_if)
            _ip("-n", self.ns, "link", "set", self.peer_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, str(PORT), ANSWER],
                    stdout=out, stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 10
            while "ready" not in self.log.read_text():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"private network server did not start: {self.log.read_text()}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def connections(self) -> list[str]:
        """Peers whose TCP connections reached the listener."""
        return [line.split()[1] for line in self.log.read_text().splitlines() if line.startswith("tcp ")]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
