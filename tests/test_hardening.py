"""Hardened session containers, seen from inside and from Docker: capabilities, read-only root,
tmpfs, no-new-privileges, no Docker socket, no host mounts; and the root mode."""

from __future__ import annotations

import re

import pytest

import bridge.docker_backend
from bridge.docker_backend import SESSION_CAPS, DockerBackend
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


@pytest.mark.parametrize("missing", [None, *SESSION_CAPS], ids=["none (control)", *SESSION_CAPS])
async def test_every_capability_in_the_set_is_needed(start_gateway, user, monkeypatch, caplog, missing):
    """The set is minimal: without any one capability the container's sshd cannot bring a shell
    up, and with all of them, everything else alike (the control), it does."""
    caps = tuple(c for c in SESSION_CAPS if c != missing)
    monkeypatch.setattr(bridge.docker_backend, "SESSION_CAPS", caps)
    granted: list[list[str]] = []  # observed, not replaced: the real calls run
    running: list[str] = []
    host_config, start = DockerBackend._host_config, DockerBackend.start

    def observed_host_config(self, api, root):
        config = host_config(self, api, root)
        granted.append(sorted(config["CapAdd"]))
        return config

    async def observed_start(self, spec):
        container = await start(self, spec)
        running.append(container.id)
        return container

    monkeypatch.setattr(DockerBackend, "_host_config", observed_host_config)
    monkeypatch.setattr(DockerBackend, "start", observed_start)
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
    assert granted == [sorted(caps)] and len(running) == 1  # the container ran, with exactly this set
    if missing is not None:
        failures = [
            r.getMessage() + (repr(r.exc_info[1]) if r.exc_info else "")
            for r in caplog.records if r.name == "termbridge.sessions" and "start failed" in r.getMessage()
        ]
        assert len(failures) == 1 and SSHD_FAILURE.search(failures[0]), failures
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
