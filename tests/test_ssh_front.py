"""The SSH door with real clients: Debian's OpenSSH (ssh, scp, sftp, through sshpass or
SSH_ASKPASS) and asyncssh, against a real gateway, real PAM accounts and real containers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from bridge.app import SSH_DOOR
from bridge.config import SessionConfig
from bridge.backends.docker import DockerBackend
from bridge.errors import ConfigError
from bridge.ssh_channels import MAX_ENV_VARS
from bridge.ssh_keys import load_or_create_host_key, read_authorized_keys
from bridge.web.keys import MANAGER
from helpers import (
    PROMPT, Gateway, HostUser, assert_same_timing, containers_gone, free_port, refusal_times, session_containers,
    wait_for,
)

SSH_ON = {"listen": "127.0.0.1:0"}


@dataclass
class Door:
    """A gateway with its SSH door on a loopback port, and the client options to reach it."""

    gateway: Gateway
    port: int
    known_hosts: Path

    def options(self, *extra: str) -> list[str]:
        return [
            "-F", "/dev/null",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=no",
            "-o", "ConnectTimeout=30",
            *extra,
        ]

    def ssh(self, user: HostUser, *args: str, options: Sequence[str] = ()) -> list[str]:
        return ["ssh", *self.options(*options), "-p", str(self.port), f"{user.name}@127.0.0.1", *args]

    async def run(
        self, argv: list[str], password: str | None = None, input: bytes | None = None, timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> tuple[int, bytes, str]:
        """Run a client (through sshpass when a password is given); (exit status, stdout, stderr)."""
        env = {**os.environ, **(env or {})}
        if password is not None:
            env["SSHPASS"] = password
            argv = ["sshpass", "-e", *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        return proc.returncode, out, err.decode(errors="replace")

    async def start(self, user: HostUser, *args: str, options: Sequence[str] = ()) -> asyncio.subprocess.Process:
        """A long-running ssh in its own process group (the caller kills it)."""
        return await asyncio.create_subprocess_exec(
            "sshpass", "-e", *self.ssh(user, *args, options=options), env={**os.environ, "SSHPASS": user.password},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )

    def connect(self, user: HostUser, **kwargs: Any) -> Any:
        """An asyncssh client connection (an async context manager)."""
        options: dict[str, Any] = {
            "username": user.name, "password": user.password, "known_hosts": None, "client_keys": None,
            "agent_path": None, "config": [], "preferred_auth": "password",
        }
        options.update(kwargs)
        return asyncssh.connect("127.0.0.1", self.port, **options)

    def sessions_of(self, user: HostUser) -> list[Any]:
        return [s for s in self.gateway.app[MANAGER].list() if s.user.name == user.name]


@pytest.fixture
def start_door(start_gateway: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    async def start(backend: Any = None, **sections: dict[str, Any]) -> Door:
        sections["ssh"] = {**SSH_ON, **sections.get("ssh", {})}
        gateway = await start_gateway(backend, **sections)
        return Door(gateway, gateway.app[SSH_DOOR].port, tmp_path / f"known_hosts{secrets.token_hex(3)}")

    return start


@pytest.fixture
async def door(start_door: Callable[..., Any]) -> Door:
    return await start_door()


def kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def until_running(user: HostUser) -> Any:
    found: list[Any] = []

    def running() -> bool:
        found[:] = [c for c in session_containers(**{"termbridge.user": user.name}) if c.status == "running"]
        return bool(found)

    await wait_for(running, timeout=30, what=f"a running container of {user.name}")
    return found[0]


# -- host key -------------------------------------------------------------------------------------


def test_asyncssh_still_has_the_private_hook_the_door_uses():
    """`start_as_process` relies on SSHServerProcess._start_process(stdin, stdout, stderr), which
    asyncssh does not document: an asyncssh that renames or reshapes it must fail here."""
    import inspect

    import asyncssh

    hook = getattr(asyncssh.SSHServerProcess, "_start_process", None)
    assert hook is not None, "asyncssh.SSHServerProcess._start_process is gone: see ssh_channels.start_as_process"
    assert list(inspect.signature(hook).parameters) == ["self", "stdin", "stdout", "stderr"]


def test_host_key_is_created_0600_once_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "hk"
    key = load_or_create_host_key(path)
    assert key.algorithm == b"ssh-ed25519"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = load_or_create_host_key(path)
    assert again.public_data == key.public_data
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="ssh.host_key.*chmod 600"):
        load_or_create_host_key(path)
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="ssh.host_key.*cannot be read"):
        load_or_create_host_key(path)


async def test_the_host_key_is_the_same_after_a_restart(start_door, tmp_path):
    path = tmp_path / "host_key"
    first = await start_door(ssh={"host_key": str(path)})
    presented = await asyncssh.get_server_host_key("127.0.0.1", first.port)
    second = await start_door(ssh={"host_key": str(path)})  # a new gateway reading the same file
    assert (await asyncssh.get_server_host_key("127.0.0.1", second.port)).public_data == presented.public_data
    assert asyncssh.read_private_key(path).public_data == presented.public_data
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    default = first.gateway.config.state_dir / "ssh_host_ed25519_key"
    assert not default.exists()
    third = await start_door()
    key = await asyncssh.get_server_host_key("127.0.0.1", third.port)
    assert key.public_data == asyncssh.read_private_key(third.gateway.config.ssh_host_key).public_data
    assert key.algorithm == b"ssh-ed25519"


# -- password and keyboard-interactive ------------------------------------------------------------


@pytest.mark.parametrize("method", ["password", "keyboard-interactive"])
async def test_password_login_runs_the_command_and_returns_its_status(door, user, method):
    rc, out, err = await door.run(
        door.ssh(user, "echo out; whoami; echo err >&2; exit 7", options=["-o", f"PreferredAuthentications={method}"]),
        password=user.password,
    )
    assert rc == 7, err
    assert out.decode().split() == ["out", user.name]
    assert "err" in err
    await containers_gone(**{"termbridge.user": user.name})


@pytest.mark.parametrize("kind", ["wrong password", "unknown user", "locked", "nologin shell"])
async def test_refused_logins_start_nothing(door, make_user, kind):
    user = {"locked": lambda: make_user(locked=True), "nologin shell": lambda: make_user(shell="/usr/sbin/nologin")}.get(
        kind, make_user
    )()
    password = "not-" + user.password if kind == "wrong password" else user.password
    if kind == "unknown user":
        user = HostUser("tbnobody" + secrets.token_hex(3), user.password)
    argv = door.ssh(user, "true", options=["-o", "NumberOfPasswordPrompts=1", "-o", "PubkeyAuthentication=no"])
    rc, _, err = await door.run(argv, password=password)
    assert rc != 0
    assert "Permission denied" in err or rc == 5  # sshpass says 5 when the password prompt comes again
    assert not session_containers(**{"termbridge.user": user.name})


async def test_three_wrong_passwords_end_the_connection(door, user, tmp_path):
    """OpenSSH asks 3 times per method and asyncssh serves keyboard-interactive from the password
    check too: without a per-connection count a client would get 6 tries."""
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho \"$1\" >> {asked}\necho wrong-password\n")
    askpass.chmod(0o755)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    proc = await asyncio.create_subprocess_exec(
        *door.ssh(user, "true", options=["-o", "PubkeyAuthentication=no"]), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 255
    assert len(asked.read_text().splitlines()) == 3
    assert "too many authentication failures" in err.decode()
    assert not session_containers(**{"termbridge.user": user.name})


async def test_a_broken_pam_stack_is_told_not_hidden(start_door, user):
    broken = "termbridge-broken-" + secrets.token_hex(3)
    path = Path("/etc/pam.d") / broken
    path.write_text("auth requisite pam_does_not_exist.so\naccount required pam_permit.so\n")
    try:
        door = await start_door(auth={"pam_service": broken})
        rc, _, err = await door.run(door.ssh(user, "true"), password=user.password)
    finally:
        path.unlink()
    assert rc == 255 and "login is unavailable right now" in err, err
    assert not session_containers(**{"termbridge.user": user.name})


async def test_asyncssh_client_password_and_keyboard_interactive(door, user):
    async with door.connect(user) as conn:
        result = await conn.run("whoami", check=True)
        assert result.stdout.strip() == user.name
    answers: list[str] = []

    class OnlyKbdint(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(self, name, instructions, lang, prompts):  # type: ignore[no-untyped-def]
            answers.extend(prompt for prompt, _ in prompts)
            return [user.password] * len(prompts)

    async with door.connect(user, password=None, preferred_auth="keyboard-interactive", client_factory=OnlyKbdint) as conn:
        assert (await conn.run("echo kbd", check=True)).stdout.strip() == "kbd"
    assert answers == ["Password:"]  # one prompt, the password
    await containers_gone(**{"termbridge.user": user.name})


# -- public keys ----------------------------------------------------------------------------------


def install_key(user: HostUser, tmp_path: Path, options: str = "") -> Path:
    key = tmp_path / f"id_{user.name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    home = Path(os.path.expanduser(f"~{user.name}"))
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(f"# keys of {user.name}\n{options}{key.with_suffix('.pub').read_text()}")
    authorized.chmod(0o600)
    subprocess.run(["chown", "-R", f"{user.name}:", str(ssh_dir)], check=True)
    return key


def key_options(key: Path) -> list[str]:
    return ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey", "-o", "BatchMode=yes"]


async def test_public_key_from_authorized_keys_and_strict_modes(door, user, tmp_path):
    key = install_key(user, tmp_path)
    authorized = Path(os.path.expanduser(f"~{user.name}")) / ".ssh" / "authorized_keys"
    rc, out, err = await door.run(door.ssh(user, "echo key-ok", options=key_options(key)))
    assert (rc, out.strip()) == (0, b"key-ok"), err

    authorized.chmod(0o620)  # group-writable: sshd's StrictModes refuses the file
    rc, out, err = await door.run(door.ssh(user, "echo key-ok", options=key_options(key)))
    assert rc == 255 and "Permission denied" in err and not out
    authorized.chmod(0o600)
    authorized.parent.chmod(0o770)  # a group-writable ~/.ssh is refused just the same
    rc, _, err = await door.run(door.ssh(user, "true", options=key_options(key)))
    assert rc == 255 and "Permission denied" in err
    authorized.parent.chmod(0o700)
    subprocess.run(["chown", "nobody", str(authorized)], check=True)  # owned by someone else
    rc, _, err = await door.run(door.ssh(user, "true", options=key_options(key)))
    assert rc == 255 and "Permission denied" in err
    await containers_gone(**{"termbridge.user": user.name})


@pytest.mark.parametrize("kind", ["locked", "expired", "nologin shell", "from elsewhere"])
async def test_public_key_of_an_account_that_may_not_log_in_is_refused(door, make_user, tmp_path, kind):
    user = {
        "locked": lambda: make_user(locked=True),
        "expired": lambda: make_user(expired=True),
        "nologin shell": lambda: make_user(shell="/usr/sbin/nologin"),
    }.get(kind, make_user)()
    key = install_key(user, tmp_path, options='from="192.0.2.1" ' if kind == "from elsewhere" else "")
    rc, _, err = await door.run(door.ssh(user, "true", options=key_options(key)))
    assert rc == 255 and "Permission denied" in err
    assert not session_containers(**{"termbridge.user": user.name})


def test_authorized_keys_reading_follows_strict_modes(make_user, tmp_path):
    import pwd

    user = make_user()
    install_key(user, tmp_path)
    entry = pwd.getpwnam(user.name)
    home = Path(entry.pw_dir)
    assert "ssh-ed25519" in (read_authorized_keys(entry) or "")
    home.chmod(0o777)  # a world-writable home lets anyone swap ~/.ssh
    assert read_authorized_keys(entry) is None
    home.chmod(0o755)
    (home / ".ssh" / "authorized_keys").unlink()
    assert read_authorized_keys(entry) is None


# -- channels -------------------------------------------------------------------------------------


async def test_binary_safe_stdin_and_stdout(door, user, tmp_path):
    data = os.urandom(10 * 1024 * 1024)
    rc, out, err = await door.run(door.ssh(user, "sha256sum"), password=user.password, input=data)
    assert rc == 0, err
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    rc, out, err = await door.run(door.ssh(user, "cat"), password=user.password, input=data)
    assert rc == 0 and out == data, err


async def test_output_passed_on_in_larger_pieces_keeps_each_stream_whole_and_in_order(door, user):
    """The door joins the container's packets that arrive together: stdout and stderr, written
    in quick turns, still arrive whole and each in its own order."""
    script = "i=0; while [ $i -lt 20000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    rc, out, err = await door.run(door.ssh(user, script), password=user.password)
    assert rc == 0
    assert out.decode().split() == [f"out{i}" for i in range(20000)]
    assert [w for w in err.split() if w.startswith("err")] == [f"err{i}" for i in range(20000)]  # ssh's own warnings aside


async def test_pty_env_window_change_and_channels_share_one_container(door, user):
    async with door.connect(user) as conn:
        proc = await conn.create_process(
            term_type="xterm-256color", term_size=(100, 30),
            env={"LANG": "C.UTF-8", "LC_TIME": "C.UTF-8", "FOO": "bar"}, encoding=None,
        )
        output = bytearray()

        async def expect(pattern: bytes) -> re.Match[bytes]:
            regex = re.compile(pattern)
            while not (match := regex.search(bytes(output))):
                output.extend(await asyncio.wait_for(proc.stdout.read(65536), 30))
            del output[: match.end()]
            return match

        await expect(PROMPT.pattern)
        proc.stdin.write(b"echo S:$(stty size):$TERM:$LANG:$LC_TIME:${FOO-unset}:$(cat /etc/hostname):E\n")
        match = await expect(rb"S:(\d+ \d+):([^:]*):([^:]*):([^:]*):([^:]*):([^:]*):E")
        assert match.group(1, 2, 3, 4, 5) == (b"30 100", b"xterm-256color", b"C.UTF-8", b"C.UTF-8", b"unset")
        hostname = match.group(6)
        proc.change_terminal_size(132, 40)
        await asyncio.sleep(0.2)
        proc.stdin.write(b"echo S:$(stty size):E\n")
        assert (await expect(rb"S:(\d+ \d+):E")).group(1) == b"40 132"

        # More channels of the same connection run in the same container.
        assert (await conn.run("cat /etc/hostname", check=True)).stdout.strip() == hostname.decode()
        [container] = session_containers(**{"termbridge.user": user.name})
        assert container.labels["termbridge.door"] == "ssh"
        [session] = door.sessions_of(user)
        assert session.bytes_in > 0 and session.bytes_out > 0

        # exit status and exit signal reach the client
        assert (await conn.run("exit 3")).exit_status == 3
        killed = await conn.run("kill -TERM $$")
        assert killed.exit_signal is not None and killed.exit_signal[0] == "TERM"
        sleeper = await conn.create_process("exec sleep 100")
        await asyncio.sleep(0.3)
        sleeper.send_signal("INT")  # a signal request, passed on to the container's sshd
        await asyncio.wait_for(sleeper.wait_closed(), 15)
        assert sleeper.exit_signal is not None and sleeper.exit_signal[0] == "INT"

        # forwarding is refused
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", door.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", door.port)

        proc.stdin.write(b"exit 5\n")
        await asyncio.wait_for(proc.wait_closed(), 30)
        assert proc.exit_status == 5
    await containers_gone(**{"termbridge.user": user.name})


async def test_forwarding_is_refused_to_openssh(door, user, tmp_path):
    """-R, -X and -A: the session goes on without them (ExitOnForwardFailure makes -R fatal)."""
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        await wait_for(agent_sock.exists, what="ssh-agent's socket")
        command = "echo agent=${SSH_AUTH_SOCK:-none} display=${DISPLAY:-none}"
        argv = door.ssh(user, command, options=["-A", "-X", "-R", "0:127.0.0.1:9"])
        rc, out, err = await door.run(argv, password=user.password, env={"SSH_AUTH_SOCK": str(agent_sock), "DISPLAY": ":9"})
        assert rc == 0, err
        assert out.split() == [b"agent=none", b"display=none"]
        assert "remote port forwarding failed" in err and "X11 forwarding request failed" in err, err
        argv = door.ssh(user, "true", options=["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"])
        rc, _, err = await door.run(argv, password=user.password)
        assert rc == 255 and "forwarding failed" in err
    finally:
        agent.terminate()
        agent.wait()
    await containers_gone(**{"termbridge.user": user.name})


async def test_scp_and_sftp_both_ways_in_the_connections_container(door, user, tmp_path):
    """One master connection (ControlMaster), many channels: ssh, scp and sftp all land in the
    one container of that connection."""
    control = tmp_path / "cm"
    master = await door.start(user, options=["-M", "-S", str(control), "-N"])
    via = ["-o", f"ControlPath={control}"]
    try:
        await until_running(user)
        await wait_for(control.exists, timeout=30, what="the control socket")
        up = tmp_path / "up.bin"
        up.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
        digest = hashlib.sha256(up.read_bytes()).hexdigest()

        rc, _, err = await door.run(["scp", *door.options(*via), "-P", str(door.port), str(up), f"{user.name}@127.0.0.1:up.bin"])
        assert rc == 0, err
        rc, out, err = await door.run(door.ssh(user, "sha256sum up.bin", options=["-S", str(control)]))
        assert rc == 0 and out.split()[0].decode() == digest, (rc, out, err)

        batch = tmp_path / "batch"
        batch.write_text(f"get up.bin {tmp_path / 'sftp-down.bin'}\nput {up} put.bin\n")
        rc, _, err = await door.run(["sftp", *door.options(*via), "-b", str(batch), "-P", str(door.port), f"{user.name}@127.0.0.1"])
        assert rc == 0, err
        assert (tmp_path / "sftp-down.bin").read_bytes() == up.read_bytes()

        down = tmp_path / "scp-down.bin"
        rc, _, err = await door.run(["scp", *door.options(*via), "-P", str(door.port), f"{user.name}@127.0.0.1:put.bin", str(down)])
        assert rc == 0, err
        assert down.read_bytes() == up.read_bytes()
        assert len(session_containers(**{"termbridge.user": user.name})) == 1
    finally:
        kill_group(master)
        await master.wait()
    await containers_gone(**{"termbridge.user": user.name})


async def test_sftp_with_a_password(door, user, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("hello over sftp\n")
    commands = f"put {src} a.txt\nget a.txt {tmp_path / 'back.txt'}\nbye\n".encode()
    argv = ["sftp", *door.options(), "-P", str(door.port), f"{user.name}@127.0.0.1"]
    rc, _, err = await door.run(argv, password=user.password, input=commands)
    assert rc == 0, err
    assert (tmp_path / "back.txt").read_text() == "hello over sftp\n"
    await containers_gone(**{"termbridge.user": user.name})


# -- limits and failures --------------------------------------------------------------------------


async def test_idle_end_warns_on_stderr_then_closes(start_door, user):
    door = await start_door(session={"idle_timeout": "3s"})
    proc = await door.start(user, options=["-tt"])  # stdin stays open and silent
    try:
        assert proc.stderr is not None
        text = (await asyncio.wait_for(proc.stderr.read(), 60)).decode()
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        kill_group(proc)
    assert proc.returncode == 255
    assert re.search(r"termbridge: this session ends in \d+ s unless you type something", text), text
    assert "termbridge: the session was idle for too long" in text
    await containers_gone(**{"termbridge.user": user.name})


async def test_input_on_any_channel_keeps_the_session(start_door, user):
    """A shell sits idle while another channel of the connection gets input: no idle end. When
    the input stops, the shell hears the warning and the end."""
    door = await start_door(session={"idle_timeout": "2s"})
    async with door.connect(user) as conn:
        shell = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(shell.stdout.readuntil(b"$ "), 60)  # the session runs: its clock too
        feeder = await conn.create_process("cat > /dev/null", encoding=None)
        for _ in range(8):  # 3.2 s of input, well past the 2 s idle timeout
            feeder.stdin.write(b".")
            await asyncio.sleep(0.4)
        [session] = door.sessions_of(user)
        assert not session.ending and session.bytes_in >= 8
        await asyncio.wait_for(shell.wait_closed(), 15)
        said = (await shell.stderr.read()).decode()
        assert "this session ends in" in said and "idle for too long" in said, said
        assert shell.exit_status == 255
    await containers_gone(**{"termbridge.user": user.name})


async def test_dropping_the_tcp_connection_removes_the_container(door, user):
    proc = await door.start(user, "sleep 600")
    try:
        container = await until_running(user)
        assert container.labels["termbridge.door"] == "ssh"
    finally:
        kill_group(proc)  # SIGKILL: no goodbye, the socket just closes
        await proc.wait()
    await containers_gone(**{"termbridge.user": user.name})


async def test_caps_are_counted_together_with_web_sessions(start_door, make_user):
    door = await start_door(session={"max_per_user": 1, "max_total": 2})
    alice, bob, carol = make_user(), make_user(), make_user()
    async with await door.gateway.login(alice) as alice_http:
        term = await door.gateway.terminal(alice_http)
        await term.control("session")

        rc, _, err = await door.run(door.ssh(alice, "true"), password=alice.password)
        assert rc == 1 and "termbridge: you already have 1 sessions" in err and "max_per_user" in err, err

        held = await door.start(bob, "sleep 600")
        try:
            await until_running(bob)
            rc, _, err = await door.run(door.ssh(carol, "true"), password=carol.password)
            assert rc == 1 and "max_total" in err, err
            async with await door.gateway.login(carol) as carol_http:
                carol_term = await door.gateway.terminal(carol_http)
                assert "max_total" in (await carol_term.control("error"))["message"]
        finally:
            kill_group(held)
            await held.wait()
        await containers_gone(**{"termbridge.user": bob.name})
        rc, out, err = await door.run(door.ssh(carol, "echo in"), password=carol.password)
        assert (rc, out.strip()) == (0, b"in"), err
        await term.send("exit\r")
        await term.control("exit")


@pytest.mark.parametrize("failure", ["image missing", "docker down"])
async def test_start_failures_give_a_reason_and_the_door_keeps_serving(start_door, user, tmp_path, failure):
    if failure == "image missing":
        door = await start_door(session={"image": "termbridge/does-not-exist:nope"})
        expected = "session image is not installed"
    else:
        nowhere = f"unix://{tmp_path}/no-docker.sock"
        door = await start_door(backend=DockerBackend(SessionConfig(), "test-ssh-down", base_url=nowhere))
        expected = "container service is unavailable"
    for _ in range(2):
        rc, out, err = await door.run(door.ssh(user, "echo should-not-run"), password=user.password)
        assert rc == 1 and not out
        [line] = [line for line in err.splitlines() if line.startswith("termbridge:")]
        assert expected in line
    await containers_gone(**{"termbridge.user": user.name})


async def test_gateway_shutdown_tells_ssh_clients_why(gateway_process, tmp_path, user):
    """SIGTERM to `termbridge serve`: every SSH client hears why on stderr, then its container goes."""
    ssh_port = free_port()
    process = gateway_process(ssh={"listen": f"127.0.0.1:{ssh_port}"})
    await process.start()
    door = Door(None, ssh_port, tmp_path / "known_hosts")  # type: ignore[arg-type]
    client = await door.start(user, "sleep 600")
    try:
        await until_running(user)
        process.signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(client.communicate(), 30)
        assert client.returncode == 255
        assert "termbridge: the gateway is shutting down" in err.decode()
        assert await process.wait(15) == 0
    finally:
        kill_group(client)
    await containers_gone(**{"termbridge.user": user.name})


# -- security checks survive `python -O` ------------------------------------------------------------


def test_no_assert_statement_in_the_gateway():
    """`python -O` strips asserts: no check in bridge/ may rely on one."""
    import ast

    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted((Path(__file__).parent.parent / "bridge").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, found


def test_a_login_our_checks_did_not_vouch_for_gets_no_session_under_python_O():
    """The SSH door's last check (the user asyncssh says logged in is the one our checks vouched
    for), run under `python -O`: a mismatch closes the connection and starts nothing."""
    script = """
import asyncio
from bridge.auth import AuthenticatedUser
from bridge.ssh_front import SshConnection

class Conn:
    closed = None
    def get_extra_info(self, name):
        return {"username": "mallory", "peername": ("192.0.2.9", 1)}.get(name)
    def is_closed(self):
        return False
    def disconnect(self, code, reason):
        Conn.closed = reason

class Manager:
    created = []
    def note_login(self, *args):
        pass
    async def create(self, user, door, sink):
        Manager.created.append(user.name)

class Door:
    connections = set()
    manager = Manager()

async def main():
    connection = SshConnection(Door())
    connection.connection_made(Conn())
    connection.user = AuthenticatedUser("alice", 1000, 1000)
    connection.auth_completed()
    await asyncio.sleep(0.1)
    print(Conn.closed, Manager.created)

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "authentication failed []", done.stdout + done.stderr


# -- password guesses the client gives up on ---------------------------------------------------------


async def abandon_password(door: Door, name: str, password: str, after: float, source: str = "127.0.0.1") -> None:
    """One password from `source`; the client gives up (drops the connection) after `after` s."""
    try:
        async with asyncio.timeout(after):
            async with door.connect(HostUser(name, password), local_addr=(source, 0)):
                pass
    except (TimeoutError, asyncssh.Error, OSError):
        pass


def audit_events(path: Path, kind: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


async def test_abandoned_password_guesses_are_counted_audited_and_lock_out(start_door, user, tmp_path):
    """12 wrong passwords, each abandoned after 0.5 s: every one is audited, those PAM heard count
    as failures, and the lockout they earn holds against the right password."""
    audit = tmp_path / "audit.log"
    door = await start_door(auth={"max_failures": 3, "lockout": "10m"}, audit={"log": str(audit)})
    for i in range(12):
        await abandon_password(door, user.name, f"wrong-guess-{i}", after=0.5)

    def logins() -> list[dict[str, Any]]:
        return [e for e in audit_events(audit, "login") if e["user"] == user.name and e["door"] == "ssh"]

    await wait_for(lambda: len(logins()) >= 12, timeout=40, what="12 audited ssh logins")
    results = [e["result"] for e in logins()]
    assert results.count("denied") >= 3 and set(results) <= {"denied", "throttled"}, results
    with pytest.raises(asyncssh.PermissionDenied):
        async with door.connect(user):
            pass
    assert logins()[-1]["result"] == "throttled"
    assert not session_containers(**{"termbridge.user": user.name})


async def test_abandoned_checks_do_not_take_the_pam_workers_others_need(start_door, make_user):
    """One address keeps sending 3 guesses at a time and abandoning them after 0.5 s; meanwhile
    another person, from another address, logs in 4 times: never waiting for a PAM worker."""
    door = await start_door(auth={"pam_workers": 4, "max_failures": 1000, "max_failures_per_address": 1000})
    target, other = make_user(), make_user()

    async def attack() -> None:
        for batch in range(10):
            await asyncio.gather(*(
                abandon_password(door, target.name, f"wrong-{batch}-{i}", after=0.5, source="127.0.0.3")
                for i in range(3)
            ))

    attacker = asyncio.create_task(attack())
    await asyncio.sleep(1.5)
    took = []
    for _ in range(4):
        started = asyncio.get_running_loop().time()
        async with door.connect(other, local_addr=("127.0.0.2", 0)):
            took.append(asyncio.get_running_loop().time() - started)
        await asyncio.sleep(0.3)
    await attacker
    assert max(took) < 1.0, f"logins waited for PAM workers: {[round(t, 2) for t in took]}"
    await containers_gone(**{"termbridge.user": other.name})


async def test_refusal_timing_does_not_tell_which_accounts_exist(start_door, make_user):
    """The SSH door's refusals of unknown names and a nologin account take as long as a real
    account's wrong password."""
    door = await start_door(auth={"failure_window": 0.01, "pam_workers": 12})
    known = [make_user() for _ in range(6)]
    nologin = make_user(shell="/usr/sbin/nologin")

    async def attempt(name: str, password: str, address: str) -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with door.connect(HostUser(name, password), local_addr=(address, 0)):
                pass

    unknown = ["tbnobody" + secrets.token_hex(3) for _ in range(4)]
    wrong, refused = await refusal_times(attempt, known, [*unknown, nologin.name, nologin.name])
    assert_same_timing(wrong, refused)


# -- passwords typed as the user name ----------------------------------------------------------------

TYPED_SECRETS = ["Hunter2!Correct Horse", "correct.horse-battery9"]  # the second looks like a user name


async def test_a_password_typed_as_the_user_name_is_never_logged_or_audited(start_door, user, tmp_path, caplog):
    """Both doors, each secret typed as the user name: it is in no log line (at DEBUG, the server's
    asyncssh included) and no audit event; the events say `<unknown name, N chars>` instead. A real
    account's name is still logged."""
    caplog.set_level(logging.DEBUG)
    audit = tmp_path / "audit.log"
    door = await start_door(audit={"log": str(audit)})
    for secret in TYPED_SECRETS:  # OpenSSH as the client: asyncssh would log the name client-side
        assert await door.gateway.attempt_login(secret, "whatever") == 401
        argv = door.ssh(HostUser(secret, ""), "true", options=["-o", "NumberOfPasswordPrompts=1"])
        rc, _, _ = await door.run(argv, password="whatever")
        assert rc != 0
    assert await door.gateway.attempt_login(user.name, "not-" + user.password) == 401
    await wait_for(lambda: len(audit_events(audit, "login")) >= 5, what="5 audited logins")
    logins = audit_events(audit, "login")
    for secret in TYPED_SECRETS:
        assert secret not in audit.read_text()
        assert not [r for r in caplog.records if secret in r.getMessage()], secret
        assert f"<unknown name, {len(secret)} chars>" in {e["user"] for e in logins}
    assert user.name in {e["user"] for e in logins}


# -- env requests --------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_env_requests_are_capped_per_channel_and_connection(gateway_process, user):
    """60 MB of `env` requests on one channel of a real gateway process: its RSS stays flat while
    the channel is open, and the container sees at most the per-channel cap of them; over many
    channels the connection's budget runs out, with a log line for the admin."""
    port = free_port()
    gateway = gateway_process(ssh={"listen": f"127.0.0.1:{port}"})
    await gateway.start()
    pid = gateway.proc.pid
    value = "x" * 2000
    async with asyncssh.connect(
        "127.0.0.1", port, username=user.name, password=user.password, known_hosts=None, client_keys=None,
        agent_path=None, config=[], preferred_auth="password",
    ) as conn:
        assert (await conn.run("true", check=True)).exit_status == 0  # the container is up
        before = rss_mb(pid)
        env = {f"LC_T{i}": value for i in range(30_000)}
        proc = await conn.create_process("printenv | grep -c '^LC_T'; sleep 3", env=env)
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        during = rss_mb(pid)
        proc.close()
        counts = []
        for _ in range(20):
            result = await conn.run("printenv | grep -c '^LC_T' || true", env={f"LC_T{i}": value for i in range(8)})
            counts.append(int(result.stdout.strip()))
    assert during - before < 20, f"gateway RSS grew from {before:.0f} to {during:.0f} MB"
    assert 0 < int(first) <= MAX_ENV_VARS
    assert counts[0] == 8 and counts[-1] == 0, counts  # the connection's budget ran out
    assert "ssh env requests from 127.0.0.1 refused" in gateway.log()


# -- authorized_keys options and files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "argv", "expected"),
    [
        ('expiry-time="20200101" ', ["true"], None),  # expired: refused
        ('expiry-time="20991231Z" ', ["echo", "in-time"], b"in-time"),
        ("restrict ", ["-tt", "tty"], "PTY allocation request failed"),
        ("restrict,pty ", ["-tt", "tty"], b"/dev/pts/"),
        ("no-pty ", ["-tt", "tty"], "PTY allocation request failed"),
        ('command="echo forced" ', ["echo", "asked"], b"forced"),
        ('from="192.0.2.1" ', ["true"], None),
        ('from="127.0.0.1",no-agent-forwarding,no-user-rc,permitopen="a:1",environment="A=b" ', ["echo", "ok"], b"ok"),
        ("bogus-option ", ["true"], None),  # unknown: the key is skipped
        ("verify-required ", ["true"], None),  # not implemented: skipped, not ignored
        ("cert-authority ", ["true"], None),
    ],
)
async def test_authorized_keys_options_are_honoured_like_sshd(door, user, tmp_path, options, argv, expected):
    key = install_key(user, tmp_path, options=options)
    tty = [argv.pop(0)] if argv[0] == "-tt" else []
    rc, out, err = await door.run(["ssh", *door.options(*key_options(key)), *tty, "-p", str(door.port),
                                   f"{user.name}@127.0.0.1", *argv])
    if expected is None:
        assert rc == 255 and "Permission denied" in err, (rc, out, err)
    elif isinstance(expected, str):  # what OpenSSH says when the pty is refused
        assert expected in err and "Permission denied" not in err, (rc, out, err)
    else:
        assert expected in out, (rc, out, err)
    await containers_gone(**{"termbridge.user": user.name})


@pytest.mark.parametrize("content", ["# only a comment\n", 'no-pty,bad-option="x" ssh-ed25519 AAAA\n', "garbage\n"])
async def test_a_broken_authorized_keys_only_turns_key_login_off(door, user, tmp_path, caplog, content):
    key = install_key(user, tmp_path)
    authorized = Path(os.path.expanduser(f"~{user.name}")) / ".ssh" / "authorized_keys"
    good = authorized.read_text()
    authorized.write_text(content)
    with caplog.at_level(logging.WARNING, logger="termbridge.ssh"):
        rc, out, err = await door.run(door.ssh(user, "echo by-password", options=["-o", "PubkeyAuthentication=no"]),
                                      password=user.password)
    assert (rc, out.strip()) == (0, b"by-password"), err
    assert any("authorized_keys of " + user.name in r.getMessage() for r in caplog.records)
    authorized.write_text(content + good)  # a bad line does not spoil the good one after it
    rc, out, err = await door.run(door.ssh(user, "echo by-key", options=key_options(key)))
    assert (rc, out.strip()) == (0, b"by-key"), err
    await containers_gone(**{"termbridge.user": user.name})


@pytest.mark.parametrize("target", ["root-only file", "device"])
async def test_authorized_keys_is_read_with_the_users_permissions(door, user, tmp_path, target, monkeypatch):
    """A symlink to a file only root may read, or to a device: no key login (and the device is
    never opened), while the password still works."""
    key = install_key(user, tmp_path)
    authorized = Path(os.path.expanduser(f"~{user.name}")) / ".ssh" / "authorized_keys"
    if target == "device":
        pointed = Path("/dev/ptmx")
    else:
        pointed = Path("/root") / f"tb-authorized-{secrets.token_hex(3)}"
        pointed.write_text(authorized.read_text())
        pointed.chmod(0o600)
    authorized.unlink()
    os.symlink(pointed, authorized)
    opened: list[str] = []
    real_open = os.open

    def watched_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    try:
        rc, _, err = await door.run(door.ssh(user, "true", options=key_options(key)))
        assert rc == 255 and "Permission denied" in err
        rc, out, err = await door.run(door.ssh(user, "echo pw", options=["-o", "PubkeyAuthentication=no"]),
                                      password=user.password)
        assert (rc, out.strip()) == (0, b"pw"), err
    finally:
        if target != "device":
            pointed.unlink()
    assert "/dev/ptmx" not in opened
    await containers_gone(**{"termbridge.user": user.name})
