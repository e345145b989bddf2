"""The web door end to end with a WebSocket client: real gateway, real PAM user, real container."""

from __future__ import annotations

import asyncio
import re

from helpers import PROMPT, TEST_IMAGE, containers_gone, session_containers, wait_for


async def test_session_runs_commands_and_exit_removes_container(gateway, user):
    http = await gateway.login(user)
    async with http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        assert session["idle_timeout"] == 900
        assert session["offset"] == 0
        await term.expect(PROMPT)
        assert (await term.run("echo $((6*7))")).strip() == "42"
        assert (await term.run("whoami")).strip() == user.name
        assert int((await term.run("id -u")).strip()) >= 1000

        [container] = session_containers(**{"termbridge.session": session["id"]})
        labels = container.labels
        assert labels["termbridge.user"] == user.name
        assert labels["termbridge.door"] == "web"
        assert labels["termbridge.gateway"]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", labels["termbridge.started"])
        assert container.name == f"termbridge-{session['id'][:8]}"

        await term.send("exit\r")
        assert await term.control("exit") == {"type": "exit", "code": 0, "reason": "exit"}
        await term.drain_until_closed()
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_exit_status_is_reported(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await term.expect(PROMPT)
        await term.send("exit 7\r")
        assert await term.control("exit") == {"type": "exit", "code": 7, "reason": "exit"}


async def test_limits_are_visible_inside_the_container(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await term.expect(PROMPT)
        # cgroup v2 and v1 spell the same limits differently; read whichever this host has.
        script = (
            "if [ -f /sys/fs/cgroup/memory.max ]; then "
            "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max; "
            "else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes "
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/pids/pids.max "
            "2>/dev/null; fi"
        )
        values = (await term.run(script)).split()
        memory = 200 * 1024 * 1024
        if len(values) == 4:  # cgroup v2: memory.max, "quota period", pids.max
            assert int(values[0]) == memory
            assert int(values[1]) / int(values[2]) == 0.5
            assert values[3] == "256"
        else:
            assert int(values[0]) == memory
            assert values[-1] == "256"
            quota, period = int(values[-3]), int(values[-2])
            assert quota / period == 0.5
        session = await term.control("session")
        [container] = session_containers(**{"termbridge.session": session["id"]})
        host_config = container.attrs["HostConfig"]
        assert host_config["NanoCpus"] == 500_000_000
        assert host_config["Memory"] == memory
        assert host_config["MemorySwap"] == memory
        assert host_config["PidsLimit"] == 256
        assert host_config["Privileged"] is False
        assert "ALL" in host_config["CapDrop"]
        assert "no-new-privileges" in host_config["SecurityOpt"]
        assert not host_config.get("Binds")
        await term.send("exit\r")
        await term.control("exit")


async def test_closing_the_socket_removes_the_container_after_the_grace(start_gateway, user):
    gateway = await start_gateway(session={"reconnect_grace": "1s"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await term.ws.close()
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_socket_closed_during_start_leaves_nothing(gateway, user, caplog):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        # close while the session starts: its container exists, its shell does not yet
        await wait_for(lambda: session_containers(**{"termbridge.user": user.name}), interval=0.01,
                       what="the session's container to be created")
        await term.ws.close()
    await containers_gone(**{"termbridge.user": user.name})
    await asyncio.sleep(2)  # and no container lands late
    assert not session_containers(**{"termbridge.user": user.name})
    assert any("ended: reason=cancelled" in r.getMessage() for r in caplog.records), "the start was not cancelled"


async def test_resize_reaches_the_pty(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http, cols=132, rows=40)
        await term.expect(PROMPT)
        assert (await term.run("stty size")).strip() == "40 132"
        await term.resize(100, 30)
        await asyncio.sleep(0.2)
        assert (await term.run("stty size")).strip() == "30 100"
        await term.send("exit\r")
        await term.control("exit")


async def test_bad_control_messages_get_an_error_and_the_session_goes_on(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await term.control("session")
        await term.expect(PROMPT)
        for bad in ["{not json", "[1,2]", '{"type":"resize","cols":0,"rows":10}', '{"type":"resize","cols":5000,"rows":10}',
                    '{"type":"resize","cols":"80","rows":24}', '{"type":"launch-missiles"}', '{"no":"type"}']:
            term.controls.clear()
            await term.ws.send_str(bad)
            error = await term.control("error")
            assert error["message"], bad
        assert (await term.run("echo still-here")).strip() == "still-here"
        await term.send("exit\r")
        await term.control("exit")


async def test_end_message_ends_the_session_like_exit(gateway, user):
    """The page's "End session" button: `{"type":"end"}` ends the session even while a program
    runs, reason `exit` with no status (the shell did not choose one), and the container goes."""
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await term.send("sleep 600\r")
        await term.ws.send_str('{"type":"end"}')
        assert await term.control("exit") == {
            "type": "exit", "code": None, "reason": "exit", "message": "you ended the session",
        }
        await term.drain_until_closed()
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_the_host_key_is_pinned(gateway, user, docker_engine):
    """A session's sshd presenting any host key but the one generated for it is refused."""
    import asyncssh

    from bridge.backends.base import Container
    from bridge.errors import SessionStartError
    from bridge.upstream import SessionKeys, Upstream

    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        [container] = session_containers(**{"termbridge.session": session["id"]})
        address = container.attrs["NetworkSettings"]["Networks"]["termbridge-isolated"]["IPAddress"]
        target = Container(id=container.id, name=container.name, address=address, port=22, ssh_user=user.name)
        wrong = SessionKeys.generate()  # right format, wrong keys: both pinned host key and client key differ
        try:
            await Upstream.connect(target, wrong, timeout=5)
        except SessionStartError as exc:
            assert isinstance(exc.__cause__, asyncssh.HostKeyNotVerifiable), exc.__cause__
        else:
            raise AssertionError("connected to an sshd whose host key was not pinned")
        await term.send("exit\r")
        await term.control("exit")


def test_image_has_no_baked_host_keys(docker_engine):
    out = docker_engine.containers.run(
        TEST_IMAGE, entrypoint=["sh", "-c", "ls /etc/ssh/ssh_host_* /run/termbridge 2>/dev/null | wc -l; "
                                "readlink /etc/passwd /etc/shadow"],
        remove=True,
    )
    assert out.decode().split() == ["0", "/run/termbridge/etc/passwd", "/run/termbridge/etc/shadow"]


def test_sshd_config_refuses_passwords_and_forwarding(docker_engine):
    out = docker_engine.containers.run(
        TEST_IMAGE,
        entrypoint=["sh", "-c", "mkdir -p /run/termbridge/sshd_config.d /run/termbridge/etc /run/sshd && "
                    "cp /etc/termbridge/base/* /run/termbridge/etc/ && "
                    "ssh-keygen -q -t ed25519 -N '' -f /run/termbridge/ssh_host_ed25519_key && "
                    "printf 'AllowUsers x\\nPermitRootLogin no\\n' > /run/termbridge/sshd_config.d/10-mode.conf && "
                    "/usr/sbin/sshd -T"],
        remove=True,
    ).decode().lower()
    for line in ["passwordauthentication no", "kbdinteractiveauthentication no", "allowtcpforwarding no",
                 "allowagentforwarding no", "x11forwarding no", "permittunnel no", "allowstreamlocalforwarding no",
                 "permitrootlogin no",
                 # the session key, and a claim key per user that only a pooled Swarm container's root has
                 # (forced command `termbridge-claim`, removed by the claim)
                 "authorizedkeysfile /run/termbridge/claim_keys/%u /run/termbridge/authorized_keys"]:
        assert line in out, line
