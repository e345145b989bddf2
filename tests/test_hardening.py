"""Hardened session containers, seen from inside and from Docker: capabilities, read-only root,
tmpfs, no-new-privileges, no Docker socket, no host mounts; and the root mode."""

from __future__ import annotations

import re

import pytest

import bridge.backends.docker
from bridge.backends.docker import LOG_FILE_BYTES, LOG_FILES, SESSION_CAPS, DockerBackend
from helpers import PROMPT, TEST_IMAGE, containers_gone, session_containers

# Linux capability numbers (linux/capability.h) of the set the session image needs.
CAP_NUMBERS = {"CHOWN": 0, "SETGID": 6, "SETUID": 7, "SYS_CHROOT": 18, "AUDIT_WRITE": 29}


def cap_mask(names) -> int:
    return sum(1 << CAP_NUMBERS[name] for name in names)


def status_field(status: str, name: str) -> str:
    [line] = [line for line in status.splitlines() if line.startswith(name + ":")]
    return line.split(":", 1)[1].strip()


async def open_terminal(gateway, user):
    http = await gateway.login(user)
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    [container] = session_containers(**{"termbridge.session": session["id"]})
    return http, term, container


async def test_login_mode_container_is_hardened(gateway, user):
    http, term, container = await open_terminal(gateway, user)
    async with http:
        host = container.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"]
        assert sorted(host["CapAdd"]) == sorted(SESSION_CAPS)
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Privileged"] is False
        assert host["ReadonlyRootfs"] is True
        assert set(host["Tmpfs"]) == {"/run", "/tmp", "/home"}
        assert "nosuid" in host["Tmpfs"]["/tmp"] and "nodev" in host["Tmpfs"]["/home"]
        assert host["MemorySwap"] == host["Memory"] and host["PidsLimit"] == 256
        assert not host.get("Binds") and not container.attrs["Mounts"]
        assert not container.attrs["Config"].get("Volumes")
        assert "TERMBRIDGE_USER" in " ".join(container.attrs["Config"]["Env"])
        assert "PRIVATE KEY" not in str(container.attrs)  # keys came over stdin, not env or files

        status = await term.run("cat /proc/self/status")
        assert int(status_field(status, "CapBnd"), 16) == cap_mask(SESSION_CAPS)
        assert int(status_field(status, "CapEff"), 16) == 0  # the user's shell holds none at all
        assert status_field(status, "NoNewPrivs") == "1"

        out = await term.run(
            "for p in /etc/x /usr/bin/x /var/x /x; do touch $p 2>/dev/null && echo wrote-$p; done; "
            "touch ~/ok /tmp/ok && echo home-and-tmp-writable; stat -f -c %T ~ /tmp /run; "
            "ls -ld ~ | cut -d' ' -f1,3; test -e /var/run/docker.sock || echo no-docker-socket"
        )
        lines = out.split()
        assert not [w for w in lines if w.startswith("wrote-")], out
        assert "home-and-tmp-writable" in lines and "no-docker-socket" in lines
        assert lines.count("tmpfs") == 3, out
        assert f"drwxr-x--- {user.name}" in out
        # the session's own key material is root's alone
        assert "denied" in (await term.run("cat /run/termbridge/ssh_host_ed25519_key 2>&1")).lower()
        await term.send("exit\r")
        await term.control("exit")


async def test_root_mode_is_root_without_the_capabilities(start_gateway, user):
    gateway = await start_gateway(session={"user": "root"})
    http, term, container = await open_terminal(gateway, user)
    async with http:
        host = container.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is False
        assert sorted(host["CapAdd"]) == sorted(SESSION_CAPS) and host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert (await term.run("id -u")).strip() == "0"
        status = await term.run("cat /proc/self/status")
        assert int(status_field(status, "CapEff"), 16) == cap_mask(SESSION_CAPS)
        assert status_field(status, "NoNewPrivs") == "1"
        # what the mode is for: installing packages (a local .deb, as no network is needed for that)
        out = await term.run(
            "cd /tmp && mkdir -p p/DEBIAN p/usr/local/bin && "
            "printf 'Package: tbhello\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: t\\n' "
            "> p/DEBIAN/control && printf '#!/bin/sh\\necho hello-from-deb\\n' > p/usr/local/bin/tbhello && "
            "chmod 755 p/usr/local/bin/tbhello && dpkg-deb --build p tbhello.deb >/dev/null && "
            "dpkg -i tbhello.deb >/dev/null && tbhello; touch /etc/rootfs-writable && echo etc-writable; "
            "useradd -M tbextra && id -un tbextra",
            timeout=60,
        )
        assert out.split()[-3:] == ["hello-from-deb", "etc-writable", "tbextra"], out
        # and still none of root's other powers: no mounts, no device nodes, no raw sockets
        out = await term.run("mount -t tmpfs none /mnt 2>/dev/null || echo no-mount; "
                             "mknod /tmp/mem c 1 1 2>/dev/null || echo no-mknod")
        assert out.split() == ["no-mount", "no-mknod"]
        await term.send("exit\r")
        await term.control("exit")


# How a start fails once the container runs and its sshd lacks a capability: the SSH handshake or
# the shell's channel breaks, or never completes. A failure before the container is up (Docker,
# the image, the network) is a failure for the wrong reason.
SSHD_FAILURE = re.compile(
    r"ssh to \S+ failed|sshd at \S+ not reachable|ConnectionLost|DisconnectError|ChannelOpenError|TimeoutError"
)


# Which door shows a capability is needed: interactive shells (web, and the SSH door's first)
# come from the session holder; a command on a pty through the SSH door (`ssh -t host CMD`) from
# sshd's own pty login, which alone needs AUDIT_WRITE (it writes the login record).
SSH_DOOR_CAPS = ("AUDIT_WRITE",)
CAP_CASES = [
    *((None, door) for door in ("web", "ssh")),
    *((cap, "ssh" if cap in SSH_DOOR_CAPS else "web") for cap in SESSION_CAPS),
]


async def _ssh_door_shell(gateway, user) -> tuple[bool, str]:
    """A shell run as a command on a pty through the SSH door (sshd's pty login, not the
    holder): (whether a prompt came up, what the client saw)."""
    import asyncio

    import asyncssh

    from bridge.app import SSH_DOOR

    seen = b""
    async with asyncssh.connect(
        "127.0.0.1", gateway.app[SSH_DOOR].port, username=user.name, password=user.password, known_hosts=None,
        client_keys=None, agent_path=None, config=[], preferred_auth="password",
    ) as conn:
        process = await conn.create_process("exec bash -i", term_type="xterm", encoding=None, stderr=asyncssh.STDOUT)
        try:
            async with asyncio.timeout(30):
                while not PROMPT.search(seen):
                    chunk = await process.stdout.read(4096)
                    if not chunk:
                        return False, seen.decode(errors="replace")
                    seen += chunk
        except TimeoutError:
            return False, seen.decode(errors="replace")
        process.stdin.write(b"exit\r")
        await process.wait_closed()
    return True, seen.decode(errors="replace")


@pytest.mark.parametrize(
    "missing,door", CAP_CASES, ids=[f"{m or 'none (control)'}-{d}" for m, d in CAP_CASES]
)
async def test_every_capability_in_the_set_is_needed(start_gateway, user, monkeypatch, caplog, missing, door):
    """The set is minimal: without any one capability a shell cannot come up (at the door that
    shows it), and with all of them, everything else alike (the control), it does on both."""
    caps = tuple(c for c in SESSION_CAPS if c != missing)
    monkeypatch.setattr(bridge.backends.docker, "SESSION_CAPS", caps)
    granted: list[list[str]] = []  # observed, not replaced: the real calls run
    running: list[str] = []
    host_config, start = DockerBackend._host_config, DockerBackend.start

    def observed_host_config(self, api, *args):
        config = host_config(self, api, *args)
        granted.append(sorted(config["CapAdd"]))
        return config

    async def observed_start(self, spec):
        container = await start(self, spec)
        running.append(container.id)
        return container

    monkeypatch.setattr(DockerBackend, "_host_config", observed_host_config)
    monkeypatch.setattr(DockerBackend, "start", observed_start)
    if door == "ssh":
        gateway = await start_gateway(session={"start_timeout": "10s"}, ssh={"listen": "127.0.0.1:0"})
        came_up, seen = await _ssh_door_shell(gateway, user)
        assert came_up == (missing is None), f"without {missing}: {seen!r}"
    else:
        gateway = await start_gateway(session={"start_timeout": "10s"})
        async with await gateway.login(user) as http:
            term = await gateway.terminal(http)
            if missing is None:
                await term.control("session")
                await term.expect(PROMPT)
                await term.send("exit\r")
                assert (await term.control("exit"))["reason"] == "exit"
            else:
                while not {"session", "exit"} & {m["type"] for m in term.controls}:
                    await term._receive(60)
                assert "session" not in [m["type"] for m in term.controls], f"a shell came up without {missing}"
                assert (await term.control("exit"))["reason"] == "error", term.controls
                assert PROMPT.search(bytes(term.output)) is None
        if missing is not None:
            failures = [
                r.getMessage() + (repr(r.exc_info[1]) if r.exc_info else "")
                for r in caplog.records if r.name == "termbridge.sessions" and "start failed" in r.getMessage()
            ]
            assert len(failures) == 1 and SSHD_FAILURE.search(failures[0]), failures
    assert granted == [sorted(caps)] and len(running) == 1  # the container ran, with exactly this set
    await containers_gone(**{"termbridge.user": user.name})


async def test_an_image_from_before_the_hardening_is_refused_clearly(start_gateway, user, docker_engine):
    """An image built from an older session-image/ would wait forever for keys on stdin."""
    import io
    import secrets

    tag = f"termbridge/test-old-image:{secrets.token_hex(4)}"
    dockerfile = f'FROM {TEST_IMAGE}\nLABEL termbridge.protocol="1"\n'.encode()
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True)
    try:
        gateway = await start_gateway(session={"image": tag})
        async with await gateway.login(user) as http:
            term = await gateway.terminal(http)
            assert "out of date" in (await term.control("error"))["message"]
            assert (await term.control("exit"))["reason"] == "error"
    finally:
        docker_engine.images.remove(tag, force=True)
    assert not session_containers(**{"termbridge.user": user.name})


def log_bytes(container) -> int:
    """Bytes of the container's log on the host (json-file and its rotated files)."""
    import glob
    import os

    container.reload()
    path = container.attrs["LogPath"]
    return sum(os.path.getsize(p) for p in glob.glob(path + "*"))


async def test_a_noisy_container_cannot_fill_the_hosts_disk(gateway, user):
    """sshd writes to the container's stderr, which Docker keeps on the host. A person can make
    it talk (junk connections to the container's own sshd); whatever the amount, the log stays
    capped."""
    import asyncio

    http, term, container = await open_terminal(gateway, user)
    async with http:
        before = log_bytes(container)
        await term.run(
            "for i in $(seq 100); do timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; echo junk >&3; cat <&3' "
            ">/dev/null 2>&1; done",
            timeout=120,
        )
        per_attempt = (log_bytes(container) - before) / 100
        assert per_attempt > 0, "sshd wrote nothing for 100 junk connections: the probe proves nothing"
        # 64 MiB of noise on the entrypoint's stderr, as a person with more time would make
        noise = "head -c 67108864 /dev/zero | tr '\\0' x | fold -w 199 > /proc/1/fd/2"
        code, out = await asyncio.to_thread(container.exec_run, ["sh", "-c", noise], user="0")
        assert code == 0, out
        size = log_bytes(container)
        print(f"log: {per_attempt:.0f} bytes per junk connection; {size} bytes on disk after 64 MiB of noise")
        assert size <= LOG_FILE_BYTES * LOG_FILES + 64 * 1024, size
        await term.send("exit\r")
        await term.control("exit")


def _host_pid(token: str) -> int:
    """The host pid of the process whose command line is `sleep <token>`. The shell's prompt may
    come back before its background job has exec'd `sleep` (a loaded host): look for 10 s."""
    import os
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if fh.read().split(b"\0")[:2] == [b"sleep", token.encode()]:
                        return int(entry)
            except (OSError, ValueError):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process `sleep {token}` on the host")


async def _reads_as(uid: int, path: str) -> bool:
    """Whether a host process running as `uid` can list `path`."""
    import asyncio
    import os

    probe = f"import os\ntry:\n os.listdir({path!r}); print('read')\nexcept PermissionError: print('denied')\n"
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", probe, stdout=asyncio.subprocess.PIPE,
        preexec_fn=lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid)),
    )
    out, _ = await proc.communicate()
    return out.decode().strip() == "read"


INOTIFY_FAILS = "inotify cannot be used"


async def test_each_persons_sessions_have_a_uid_no_host_account_has(gateway, make_user):
    """Sessions all ran as uid 1000, which is a host account's uid too (shared per-uid kernel
    limits; that account could read any session's files through /proc/<pid>/root). Now each
    person's shell runs as uid_base + their host uid."""
    import pwd
    import secrets

    a, b = make_user(), make_user()
    http_a, term_a, _ = await open_terminal(gateway, a)
    http_b, term_b, _ = await open_terminal(gateway, b)
    async with http_a, http_b:
        uid_a, uid_b = int((await term_a.run("id -u")).strip()), int((await term_b.run("id -u")).strip())
        host_accounts = {e.pw_uid for e in pwd.getpwall()}
        token = str(secrets.randbelow(10**9) + 10**9)
        await term_a.run(f"sleep {token} & true")
        pid = _host_pid(token)
        home = f"/proc/{pid}/root/home/{a.name}"
        assert await _reads_as(uid_a, home)  # the probe works: the session's own uid reads it
        print(f"uids: {a.name} {uid_a}, {b.name} {uid_b}; host account with uid {uid_a}: {uid_a in host_accounts}")
        assert uid_a != uid_b
        assert uid_a not in host_accounts and uid_b not in host_accounts
        assert uid_a == gateway.config.session.uid_base + pwd.getpwnam(a.name).pw_uid  # stable per person
        assert not await _reads_as(pwd.getpwnam(a.name).pw_uid, home)

        # the per-uid inotify limit (fs.inotify.max_user_instances): A exhausts its own, B is not touched
        with open("/proc/sys/fs/inotify/max_user_instances") as fh:
            limit = int(fh.read())
        await term_a.run(f"touch /tmp/f; for i in $(seq {limit}); do tail -f /tmp/f >/dev/null 2>&1 & done; sleep 1")
        check = "touch /tmp/g; timeout 2 tail -f /tmp/g 2>&1 >/dev/null"
        assert INOTIFY_FAILS in await term_a.run(check)  # the limit bites in A
        assert INOTIFY_FAILS not in await term_b.run(check)
        await term_a.run("kill $(jobs -p) 2>/dev/null; wait")
        for term in (term_a, term_b):
            await term.send("exit\r")
            await term.control("exit")
