"""One session, both doors: `ssh -t alice@host attach [ID]` with Debian's OpenSSH client (through
sshpass, `-tt` for a pty) attaches to the person's own live web session, against the real
gateway, PAM accounts and containers. The takeover rule holds across doors (the page is told and
can take the session back); nobody attaches to another's session; the owner's ssh hears of
admins watching."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from bridge.app import SSH_DOOR
from helpers import PROMPT, Terminal, containers_gone, free_port, session_containers, wait_for

SSH_ON = {"listen": "127.0.0.1:0"}


class SshClient:
    """`ssh -tt ... attach [ID]` as a child process in its own process group."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [asyncio.create_task(self._read(proc.stdout, self.out)),
                         asyncio.create_task(self._read(proc.stderr, self.err))]

    @classmethod
    async def start(cls, port: int, user, *args: str, known_hosts: Path, command: tuple[str, ...] = ("attach",)) -> SshClient:
        """`ssh -tt user@host attach ARGS` (`command=()`: a plain interactive shell)."""
        argv = ["sshpass", "-e", "ssh", "-tt", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "StrictHostKeyChecking=no", "-p", str(port), f"{user.name}@127.0.0.1", *command, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, "SSHPASS": user.password}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        return cls(proc)

    @staticmethod
    async def _read(stream, into: bytearray) -> None:
        while chunk := await stream.read(4096):
            into.extend(chunk)

    async def expect(self, pattern: bytes, where: str = "out", timeout: float = 30) -> None:
        buffer = self.out if where == "out" else self.err
        await wait_for(lambda: re.search(pattern, bytes(buffer)), timeout=timeout,
                       what=f"{pattern!r} from ssh; got {bytes(self.out)[-300:]!r} {bytes(self.err)[-300:]!r}")

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())

    async def wait(self, timeout: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def watched_over_ssh(door, admin_http, admin, sid: str, ssh: SshClient, shown: bytes) -> dict:
    """An admin watches `sid` (seeing `shown` replayed) and stops; the ssh owner hears both on
    stderr. Returns the view's `watch` message."""
    watch = Terminal(await admin_http.ws_connect(f"/admin/watch/{sid}/ws", headers={"Origin": door.origin}))
    hello = await watch.control("watch")
    await watch.expect(shown)
    await ssh.expect(rf"administrator {admin.name} is watching this session".encode(), where="err")
    await watch.ws.close()
    await ssh.expect(rf"administrator {admin.name} stopped watching".encode(), where="err")
    return hello


@pytest.fixture
async def door(start_gateway, tmp_path, make_group):
    group = make_group()
    gateway = await start_gateway(ssh=SSH_ON, auth={"admin_groups": [group]}, audit={"log": str(tmp_path / "audit.log")})
    gateway.audit_log = tmp_path / "audit.log"
    gateway.admin_group = group
    gateway.ssh_port = gateway.app[SSH_DOOR].port
    gateway.known_hosts = tmp_path / f"known_hosts{secrets.token_hex(3)}"
    return gateway


async def test_ssh_attach_takes_over_the_web_session_and_the_page_takes_it_back(door, make_user):
    owner = make_user()
    admin = make_user(groups=(door.admin_group,))
    http, admin_http = await door.login(owner), await door.login(admin)
    ssh = None
    try:
        page = await door.terminal(http, cols=100, rows=30)
        sid = (await page.control("session"))["id"]
        await page.expect(PROMPT)
        await page.send("echo from-web-$((3*3))\r")
        await page.expect(b"from-web-9")

        ssh = await SshClient.start(door.ssh_port, owner, known_hosts=door.known_hosts)  # one session: no question
        await ssh.expect(rb"from-web-9")  # the screen so far, replayed
        await page.drain_until_closed()
        assert page.close_code == 4001  # the takeover rule: the page is told
        ssh.type("stty size; echo from-ssh-$((4*4))\r")
        await ssh.expect(rb"from-ssh-16")
        await ssh.expect(rb"\r24 80\r\n")  # the attached client is the active one: its size (ssh without a tty: 80x24)
        # the attach connection keeps no container of its own (its start was cancelled)
        await wait_for(lambda: len(session_containers(**{"termbridge.user": owner.name})) == 1,
                       what="only the web session's container")

        # an admin watching: the ssh owner hears of it, on the channel's stderr
        await watched_over_ssh(door, admin_http, admin, sid, ssh, b"from-ssh-16")

        # the page takes it back, and sees what was typed over ssh
        back = await door.terminal(http, path=f"/ws?session={sid}&offset=0", cols=100, rows=30)
        assert (await back.control("session"))["id"] == sid
        await back.expect(b"from-ssh-16")
        assert await ssh.wait() == 0
        assert b"this session was opened in another window" in ssh.err
        assert (await back.run("stty size")).strip() == "30 100"
        await back.send("exit\r")
        await back.control("exit")
        await containers_gone(**{"termbridge.session": sid})
    finally:
        if ssh is not None:
            ssh.kill()
        await http.close()
        await admin_http.close()


async def test_attach_asks_which_and_refuses_others_sessions(door, make_user):
    owner, stranger = make_user(), make_user()
    http, stranger_http = await door.login(owner), await door.login(stranger)
    try:
        pages = [await door.terminal(http) for _ in range(2)]
        ids = [(await p.control("session"))["id"] for p in pages]
        theirs = await door.terminal(stranger_http)
        their_id = (await theirs.control("session"))["id"]

        ssh = await SshClient.start(door.ssh_port, stranger, ids[0], known_hosts=door.known_hosts)
        assert await ssh.wait() == 1
        assert b"you have no live sessions matching" in ssh.err
        ssh = await SshClient.start(door.ssh_port, owner, their_id[:8], known_hosts=door.known_hosts)
        assert await ssh.wait() == 1

        ssh = await SshClient.start(door.ssh_port, owner, known_hosts=door.known_hosts)
        try:
            await ssh.expect(rb"Attach to which \(1-2")
            listed = re.findall(rb"(\d)\) ([0-9a-f]{32})", bytes(ssh.out))
            assert sorted(i.decode() for _, i in listed) == sorted(ids)
            number, chosen = listed[1]
            ssh.type(number.decode() + "\r")
            page = pages[ids.index(chosen.decode())]
            await page.drain_until_closed()
            assert page.close_code == 4001
            ssh.type("echo picked-$((8*8))\r")
            await ssh.expect(rb"picked-64")
            ssh.type("exit\r")
            assert await ssh.wait() == 0  # the shell's exit status
        finally:
            ssh.kill()
        await containers_gone(**{"termbridge.session": chosen.decode()})
        ssh = await SshClient.start(door.ssh_port, owner, known_hosts=door.known_hosts)  # one left: straight in
        try:
            await ssh.expect(PROMPT.pattern)
            ssh.type("exit 3\r")
            assert await ssh.wait() == 3
        finally:
            ssh.kill()
    finally:
        await http.close()
        await stranger_http.close()
    await containers_gone(**{"termbridge.user": owner.name})


async def test_the_page_takes_over_an_ssh_door_session_that_an_admin_watches(door, make_user):
    """An SSH-door shell runs under the holder: an admin can watch it (the ssh owner hears of
    it), and the page can attach to it; the session then outlives the ssh connection."""
    owner = make_user()
    admin = make_user(groups=(door.admin_group,))
    http, admin_http = await door.login(owner), await door.login(admin)
    ssh = await SshClient.start(door.ssh_port, owner, known_hosts=door.known_hosts, command=())
    try:
        await ssh.expect(PROMPT.pattern)
        ssh.type("echo from-ssh-door-$((2*21))\r")
        await ssh.expect(rb"from-ssh-door-42")
        async with http.get("/sessions") as resp:
            [listed] = (await resp.json())["sessions"]
        assert listed["door"] == "ssh"
        sid = listed["id"]

        assert (await watched_over_ssh(door, admin_http, admin, sid, ssh, b"from-ssh-door-42"))["user"] == owner.name

        page = await door.terminal(http, path=f"/ws?session={sid}&offset=0", cols=100, rows=30)
        assert (await page.control("session"))["id"] == sid
        await page.expect(b"from-ssh-door-42")
        assert await ssh.wait() == 0
        assert b"this session was opened in another window" in ssh.err
        await asyncio.sleep(1)  # the ssh connection is gone: the session runs on in the page
        assert (await page.run("echo page-$((2*3)); stty size")).split() == ["page-6", "30", "100"]
        await page.send("exit 4\r")
        assert (await page.control("exit"))["code"] == 4
        await containers_gone(**{"termbridge.session": sid})
    finally:
        ssh.kill()
        await http.close()
        await admin_http.close()


async def test_ssh_door_shell_exit_status_and_audit(door, make_user, tmp_path):
    """The held shell's exit status reaches the ssh client and the audit trail's channel record."""
    owner = make_user()
    ssh = await SshClient.start(door.ssh_port, owner, known_hosts=door.known_hosts, command=())
    try:
        await ssh.expect(PROMPT.pattern)
        ssh.type("exit 7\r")
        assert await ssh.wait() == 7
        assert b"termbridge:" not in ssh.err
    finally:
        ssh.kill()
    await containers_gone(**{"termbridge.user": owner.name})

    def ended() -> list[dict]:
        lines = door.audit_log.read_text().splitlines() if door.audit_log.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == "session_end" and e["user"] == owner.name]

    await wait_for(ended, what="session_end")
    [end] = ended()
    assert (end["door"], end["reason"], end["code"]) == ("ssh", "exit", 7)
    assert end["channels"] == [{"kind": "shell", "ended": "exit", "code": 7, "signal": None}]


async def test_attach_through_another_gateway_of_the_fleet(gateway_process, make_user, redis_url, tmp_path):
    """Two gateway processes sharing one Redis store: `attach` on the second's SSH door finds the
    web session the first serves, takes it over (the first's page is told) and shows its screen."""
    owner = make_user()
    store = {"url": redis_url, "secret_file": str(tmp_path / "store-key")}
    first = gateway_process(store=store)
    await first.start()
    ssh_port = free_port()
    second = gateway_process(store=store, ssh={"listen": f"127.0.0.1:{ssh_port}"})
    await second.start()
    async with await first.gateway.login(owner) as http:
        page = await first.gateway.terminal(http)
        sid = (await page.control("session"))["id"]
        await page.expect(PROMPT)
        await page.send("echo on-first-$((9*9))\r")
        await page.expect(b"on-first-81")
        ssh = await SshClient.start(ssh_port, owner, known_hosts=tmp_path / "known_hosts")
        try:
            await ssh.expect(rb"on-first-81")
            await page.drain_until_closed(timeout=15)
            assert page.close_code == 4001
            ssh.type("echo on-second-$((8*8))\r")
            await ssh.expect(rb"on-second-64")
            ssh.type("exit\r")
            assert await ssh.wait() == 0
        finally:
            ssh.kill()
    await containers_gone(**{"termbridge.session": sid})
    assert "another gateway took this session over" in first.log()
