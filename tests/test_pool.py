"""The warm pool, through real Docker: pre-started containers, each used once, refilled, counted
in the caps, reaped like the rest; the shell still runs as a user named after the login."""

from __future__ import annotations

import pwd
import signal

from helpers import PROMPT, containers_gone, session_containers, wait_for


def pooled() -> list:
    return [c for c in session_containers(**{"termbridge.door": "pool"}) if c.status == "running"]


def pooled_ids(gateway) -> set[str]:
    from bridge.web.keys import MANAGER

    return {p.container.id for p in gateway.app[MANAGER].pool.ready}


async def test_a_login_takes_a_fresh_pooled_container_and_the_pool_refills(start_gateway, make_user):
    gateway = await start_gateway(session={"pool": 2})
    await wait_for(lambda: len(pooled_ids(gateway)) == 2, timeout=60, what="the pool to fill")
    first_pool = pooled_ids(gateway)
    used: set[str] = set()
    for user in (make_user(), make_user()):
        async with await gateway.login(user) as http:
            term = await gateway.terminal(http)
            session = await term.control("session")
            await term.expect(PROMPT)
            [container] = session_containers(**{"termbridge.session": session["id"]})
            assert container.id not in used, "a pooled container was used twice"
            used.add(container.id)
            assert container.name == f"termbridge-{session['id'][:8]}"
            assert (await term.run("whoami")).strip() == user.name
            # the uid comes from the gateway at claim: uid_base + the login's host uid
            host_uid = pwd.getpwnam(user.name).pw_uid
            assert int((await term.run("id -u")).strip()) == gateway.config.session.uid_base + host_uid
            assert (await term.run("ls -ld ~ | cut -d' ' -f3")).strip() == user.name
            await term.send("exit\r")
            assert (await term.control("exit"))["reason"] == "exit"
        await containers_gone(**{"termbridge.session": session["id"]})
    assert used == first_pool, "the logins did not take the pooled containers"
    await wait_for(lambda: len(pooled_ids(gateway)) == 2, timeout=60, what="the pool to refill")
    assert not (pooled_ids(gateway) & used)


async def test_pooled_containers_count_toward_max_total(start_gateway, make_user):
    gateway = await start_gateway(session={"pool": 1, "max_total": 2, "max_per_user": 2})
    await wait_for(lambda: len(pooled_ids(gateway)) == 1, timeout=60, what="the pool to fill")
    alice, bob, carol = make_user(), make_user(), make_user()
    async with await gateway.login(alice) as ha, await gateway.login(bob) as hb, await gateway.login(carol) as hc:
        a = await gateway.terminal(ha)
        await a.control("session")  # took the pooled one; the pool refills into the last slot
        await wait_for(lambda: len(pooled_ids(gateway)) == 1, timeout=60, what="the pool to refill")
        b = await gateway.terminal(hb)
        await b.control("session")  # takes the pooled one: 2 sessions, no room left to refill
        c = await gateway.terminal(hc)
        assert "session.max_total" in (await c.control("error"))["message"]
        assert not pooled_ids(gateway)
        for term in (a, b):
            await term.send("exit\r")
            await term.control("exit")
    await wait_for(lambda: len(pooled_ids(gateway)) == 1, timeout=60, what="the pool to refill once slots are free")


async def test_pooled_containers_are_reaped_after_a_crash(gateway_process):
    process = gateway_process(session={"pool": 2})
    await process.start()
    import tomllib
    from pathlib import Path

    state_dir = Path(tomllib.loads(process.config_path.read_text())["state_dir"])
    instance = (state_dir / "instance-id").read_text().strip()
    # only this gateway's: other gateways on the machine may have pools too
    await wait_for(lambda: len([c for c in pooled() if c.labels["termbridge.gateway"] == instance]) >= 2,
                   timeout=60, what="the pool to fill")
    mine = {c.id for c in pooled() if c.labels["termbridge.gateway"] == instance}
    assert len(mine) >= 2
    process.signal(signal.SIGKILL)
    await process.wait(10)
    # restarted without a pool: what the crashed run pooled is reaped
    process.config_path.write_text(process.config_path.read_text().replace("pool = 2", "pool = 0"))
    await process.start()
    await wait_for(lambda: not ({c.id for c in pooled()} & mine), timeout=30, what="pooled leftovers to be reaped")


async def test_ssh_door_claims_from_the_pool_too(start_gateway, user, tmp_path):
    import asyncssh

    from bridge.app import SSH_DOOR

    gateway = await start_gateway(session={"pool": 1}, ssh={"listen": "127.0.0.1:0"})
    await wait_for(lambda: len(pooled_ids(gateway)) == 1, timeout=60, what="the pool to fill")
    from bridge.web.keys import MANAGER

    [ready] = gateway.app[MANAGER].pool.ready
    async with asyncssh.connect(
        "127.0.0.1", gateway.app[SSH_DOOR].port, username=user.name, password=user.password,
        known_hosts=None, client_keys=None, agent_path=None, config=[],
    ) as conn:
        result = await conn.run("whoami; hostname", check=True)
        assert result.stdout.split() == [user.name, f"tb-{ready.session_id[:8]}"]  # the pooled one
    # (a claimed container keeps the labels it was made with: find it by its session id)
    await containers_gone(**{"termbridge.session": ready.session_id})
