"""Several gateways sharing one store: real `termbridge serve` processes on a real Redis behind the
real nginx (round-robin, no stickiness), and SIGHUP reloads of a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from bridge.web.login import COOKIE_NAME
from helpers import (
    PROMPT, ROOT, Terminal, containers_gone, csrf_token, self_signed_cert, session_containers, wait_for, write_config,
)
from test_deploy import CLIENT_ADDRESS, nginx_in_front  # noqa: F401 (a fixture)
from test_lifecycle import run_cli


def fleet_sections(redis_url: str, secret_file: Path, **session: object) -> dict[str, dict[str, object]]:
    """What the gateways of one fleet share: the store and its key file."""
    return {
        "store": {"url": redis_url, "secret_file": str(secret_file)},
        "web": {"trusted_proxies": ["127.0.0.1"]},
        "auth": {"max_failures": 3, "lockout": "60s"},
        "session": {"max_per_user": 2, **session},
    }


async def start_fleet(gateway_process, redis_url: str, tmp_path: Path, count: int = 3, **session: object) -> list:
    replicas = [gateway_process(**fleet_sections(redis_url, tmp_path / "store-key", **session)) for _ in range(count)]
    for replica in replicas:
        await replica.start()
    return replicas


class Direct:
    """A client of one replica that presents a login cookie got elsewhere (through nginx)."""

    def __init__(self, url: str, cookie: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(base_url=url, headers={"Cookie": f"{COOKIE_NAME}={cookie}"})

    async def page_status(self) -> int:
        async with self.http.get("/", allow_redirects=False) as resp:
            return resp.status

    async def terminal(self) -> Terminal:
        ws = await self.http.ws_connect("/ws", headers={"Origin": self.url}, max_msg_size=0)
        return Terminal(ws)

    async def close(self) -> None:
        await self.http.close()


async def test_a_fleet_behind_nginx_shares_logins_caps_throttle_and_logout(
    gateway_process, redis_url, nginx_in_front, make_user, tmp_path  # noqa: F811
):
    user, victim = make_user(), make_user()
    replicas = await start_fleet(gateway_process, redis_url, tmp_path)
    # auth.max_failures = 3 wrong passwords, one on each gateway: locked out on every gateway.
    for replica in replicas:
        assert await replica.gateway.attempt_login(victim.name, "wrong") == 401
    assert [await r.gateway.attempt_login(victim.name, victim.password) for r in replicas] == [429, 429, 429]

    front = await nginx_in_front(*(r.gateway.url for r in replicas))
    tls = ssl.create_default_context(cafile=str(front.cert))
    connector = aiohttp.TCPConnector(ssl=tls, local_addr=(CLIENT_ADDRESS, 0))
    proxied = replicas[0].gateway.__class__(front.https, None, None)  # type: ignore[arg-type]

    # Logged in through nginx (the form and its post may reach different gateways): the cookie
    # works on every gateway.
    async with await proxied.login(user, connector=connector) as http:
        cookie = http.cookie_jar.filter_cookies(URL(front.https))[COOKIE_NAME].value
        direct = [Direct(r.gateway.url, cookie) for r in replicas]
        try:
            assert [await d.page_status() for d in direct] == [200, 200, 200]

            # A terminal through nginx: the WebSocket upgrade reaches whichever gateway.
            ws = await http.ws_connect("/ws", headers={"Origin": front.https}, max_msg_size=0)
            proxied_term = Terminal(ws)
            proxied_id = (await proxied_term.control("session"))["id"]
            await proxied_term.expect(PROMPT)
            assert (await proxied_term.run("echo via-$((6*7))")).strip() == "via-42"
            await proxied_term.send("exit\r")
            assert (await proxied_term.control("exit"))["reason"] == "exit"
            await containers_gone(**{"termbridge.session": proxied_id})

            # max_per_user = 2 holds across gateways: one session on each of two, the third refused.
            terms = [await d.terminal() for d in direct[:2]]
            ids = [(await t.control("session"))["id"] for t in terms]
            for term in terms:
                await term.expect(PROMPT)
            third = await direct[2].terminal()
            refusal = await third.control("error")
            assert "2 sessions" in refusal["message"] and "max_per_user" in refusal["message"]
            assert len(session_containers(**{"termbridge.user": user.name})) == 2

            # Any gateway's admin socket lists the whole fleet, each session with its gateway.
            code, out, err = await run_cli("sessions", "list", "--config", str(replicas[2].config_path))
            assert code == 0, err
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
            assert set(ids) <= set(rows) and rows[ids[0]][-1] != rows[ids[1]][-1]

            # Logout through nginx (any gateway): the cookie is refused on every gateway, and the
            # terminals on other gateways end within the watch interval.
            token = await csrf_token(http, "/")
            resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": front.https}, allow_redirects=False)
            assert resp.status == 303
            for term in terms:
                exit_msg = await term.control("exit", timeout=5)
                assert exit_msg["reason"] == "killed" and "logged out" in exit_msg["message"]
            assert [await d.page_status() for d in direct] == [303, 303, 303]
        finally:
            for d in direct:
                await d.close()
    for session_id in ids:
        await containers_gone(**{"termbridge.session": session_id})


async def test_admin_kills_a_session_another_gateway_serves(gateway_process, redis_url, user, tmp_path):
    replicas = await start_fleet(gateway_process, redis_url, tmp_path, count=2)
    async with await replicas[0].gateway.login(user) as http:
        term = await replicas[0].gateway.terminal(http)
        session_id = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        code, out, err = await run_cli("sessions", "kill", session_id[:10], "--config", str(replicas[1].config_path))
        assert code == 0 and session_id in out, err
        exit_msg = await term.control("exit", timeout=5)
        assert exit_msg["reason"] == "killed" and "administrator" in exit_msg["message"]
    await containers_gone(**{"termbridge.session": session_id})
    code, out, _ = await run_cli("sessions", "list", "--config", str(replicas[1].config_path))
    assert code == 0 and session_id not in out

    # A session whose gateway died: the kill waits for it a few seconds, then removes the container.
    async with await replicas[0].gateway.login(user) as http:
        term = await replicas[0].gateway.terminal(http)
        orphan = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        replicas[0].proc.kill()
        replicas[0].proc.wait()
    code, out, err = await run_cli("sessions", "kill", "--all", "--config", str(replicas[1].config_path))
    assert code == 0 and orphan in out, err
    await containers_gone(**{"termbridge.session": orphan})
    code, out, _ = await run_cli("sessions", "list", "--config", str(replicas[1].config_path))
    assert code == 0 and orphan not in out


async def test_reapers_go_by_the_store(start_gateway, redis_url, user, tmp_path, monkeypatch):
    """A session record owns its container on every gateway; a container with neither record nor
    slot is reaped by any gateway once the grace is over; a slot that owns nothing is released."""
    from bridge import fleet
    from bridge.web.keys import MANAGER, STORE

    sections = fleet_sections(redis_url, tmp_path / "store-key")
    serving, other = await start_gateway(**sections), await start_gateway(**sections)
    reaper, store = other.app[MANAGER], other.app[STORE]
    async with await serving.login(user) as http:
        term = await serving.terminal(http)
        session_id = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        assert await reaper.reap() == 0 and session_containers(**{"termbridge.session": session_id})

        await store.delete_session(session_id)  # as if its gateway had died before recording it
        assert await reaper.reap() == 0  # within the grace: its start may be in flight
        monkeypatch.setattr(fleet, "REAP_GRACE", 0.0)
        assert await reaper.reap() == 1
        exit_msg = await term.control("exit", timeout=10)
        assert exit_msg["reason"] == "error" and "removed" in exit_msg["message"]
    await containers_gone(**{"termbridge.session": session_id})

    assert await store.reserve_slot("a-start-whose-gateway-died", user.name, 2, 50) is None
    reaper.config = dataclasses.replace(
        reaper.config, session=dataclasses.replace(reaper.config.session, start_timeout=0.5)
    )
    await reaper.reap()
    assert "a-start-whose-gateway-died" in await store.list_slots()  # younger than a start may take
    await asyncio.sleep(1.2)
    await reaper.reap()
    assert "a-start-whose-gateway-died" not in await store.list_slots()


async def test_a_store_outage_is_a_clear_error_and_sessions_go_on(start_gateway, user, tmp_path, caplog):
    from testbed.redis_server import RedisServer

    server = RedisServer().start()
    try:
        gateway = await start_gateway(**fleet_sections(server.url, tmp_path / "store-key"))
        async with await gateway.login(user) as http:
            term = await gateway.terminal(http)
            await term.control("session")
            await term.expect(PROMPT)
            server.stop()
            async with http.get("/", allow_redirects=False) as resp:
                assert resp.status == 503 and "state store is unavailable" in await resp.text()
            assert await gateway.attempt_login(user.name, user.password) == 503
            assert any("login lookup" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)
            await asyncio.sleep(2.5)  # the login watch meets the outage: it ends nothing
            assert (await term.run("echo alive-$((40+2))")).strip() == "alive-42"
            server.start()  # an empty Redis (no persistence): the login is gone, and so its terminal
            assert "logged out" in (await term.control("exit", timeout=5))["message"]
        async with await gateway.login(user) as http:
            again = await gateway.terminal(http)
            await again.control("session")
            await again.expect(PROMPT)
    finally:
        server.close()


async def test_pooled_containers_hold_fleet_slots_claimed_at_login(start_gateway, redis_url, make_user, tmp_path):
    """Two gateways, max_total 3, a pool of 1 each: the pools count fleet-wide, a login claims its
    gateway's pooled slot (the total is unchanged), and once three containers are sessions or
    pooled, a login with no pooled container to claim is refused."""
    from bridge.web.keys import MANAGER, STORE

    sections = fleet_sections(redis_url, tmp_path / "store-key", pool=1, max_total=3)
    first, second = await start_gateway(**sections), await start_gateway(**sections)
    store = first.app[STORE]

    async def pools_ready() -> bool:
        return all(len(g.app[MANAGER].pool.ready) == 1 for g in (first, second))

    async def slot_users() -> list:
        return [slot.user for slot in (await store.list_slots()).values()]

    await wait_for(pools_ready, timeout=60, what="both pools to fill")
    assert await slot_users() == [None, None]
    users = [make_user(), make_user(), make_user()]
    ids, clients, terms = [], [], []
    try:
        for gateway, user in ((first, users[0]), (second, users[1])):
            http = await gateway.login(user)
            clients.append(http)
            terms.append(await gateway.terminal(http))
            ids.append((await terms[-1].control("session"))["id"])
            await terms[-1].expect(PROMPT)
        held = await store.list_slots()
        assert [held[i].user for i in ids] == [users[0].name, users[1].name]
        assert len(held) == 3  # the third: a refill; the fourth refill was refused by max_total
        async with await second.login(users[2]) as http:
            refused = await second.terminal(http)
            assert "max_total" in (await refused.control("error"))["message"]
        for term in terms:
            await term.send("exit\r")
            await term.control("exit")
    finally:
        for http in clients:
            await http.close()
    for session_id in ids:
        await containers_gone(**{"termbridge.session": session_id})
        await wait_for(lambda: _no_slot(store, session_id), what="the session's slot to go with its container")


async def _no_slot(store, session_id: str) -> bool:
    return session_id not in await store.list_slots()


async def test_a_start_holds_its_slot_until_its_container_is_gone(tmp_path):
    """Against fakes at the backend and upstream seams, with a real store shared by two
    managers: a session killed while its container starts still counts (on every gateway) until
    that container has landed and been removed."""
    import os

    from bridge.auth import AuthenticatedUser
    from bridge.config import load_config
    from bridge.errors import LimitReached, SessionStartError
    from bridge.session import TerminalRequest
    from bridge.sessions import SessionManager
    from bridge.store.base import SecretBox
    from bridge.store.sqlite import SqliteStore
    from bridge.vocab import Door
    from fakes import FakeBackend, FakeConnect, RecordingSink, banner_server

    alice = AuthenticatedUser("alice", 1000, 1000)
    server = await banner_server()
    port = server.sockets[0].getsockname()[1]
    store = await SqliteStore.open(tmp_path / "state.db", SecretBox(os.urandom(32)))
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, "unused", session={"max_per_user": 1}), env={})
    slow = FakeBackend(port)
    slow.gate = asyncio.Event()
    starting_gateway = SessionManager(config, slow, store, "gw-a", connect=FakeConnect())
    other_gateway = SessionManager(config, FakeBackend(port), store, "gw-b", connect=FakeConnect())

    async def open_on(manager: SessionManager) -> object:
        return await manager.open_terminal(alice, Door.WEB, RecordingSink(), TerminalRequest())

    try:
        starting = asyncio.create_task(open_on(starting_gateway))
        await wait_for(lambda: starting_gateway.sessions, timeout=2, interval=0.01, what="the start to begin")
        [session] = starting_gateway.sessions.values()
        await starting_gateway.kill(session)  # e.g. logout while the container starts
        assert list(await store.list_slots()) == [session.id]
        with pytest.raises(LimitReached, match="max_per_user"):
            await open_on(other_gateway)
        slow.gate.set()  # the container lands, is found ended, and goes
        with pytest.raises(SessionStartError):
            await starting
        await wait_for(lambda: _no_slot(store, session.id), timeout=2, interval=0.01, what="the slot's release")
        assert not slow.live
        await open_on(other_gateway)  # the cap has room again
    finally:
        for manager in (starting_gateway, other_gateway):
            await manager.close()
        await store.close()
        server.close()


def state_dir_of(replica) -> Path:
    from bridge.config import load_config

    return load_config(replica.config_path, env={}).state_dir


def rewrite(replica, state_dir: Path, pam_service: str, **sections: dict[str, object]) -> None:
    """The replica's config file, written again with `sections` (its listen port and state_dir kept)."""
    sections["web"] = {"listen": f"127.0.0.1:{replica.port}", **sections.get("web", {})}
    write_config(replica.config_path, state_dir, pam_service, **sections)


async def test_sighup_applies_live_keys_and_names_the_others(gateway_process, pam_service, make_user, tmp_path):
    user = make_user()
    replica = gateway_process(session={"max_per_user": 1})
    state_dir = state_dir_of(replica)
    await replica.start()
    async with await replica.gateway.login(user) as http:
        first = await replica.gateway.terminal(http)
        await first.control("session")
        second = await replica.gateway.terminal(http)
        assert "max_per_user" in (await second.control("error"))["message"]

        rewrite(replica, state_dir, pam_service, session={"max_per_user": 2}, ssh={"listen": "127.0.0.1:0"})
        replica.signal(signal.SIGHUP)
        await wait_for(lambda: "reload: applied session.max_per_user" in replica.log(), what="the reload")
        assert "not applied (restart the gateway to change them): ssh.listen" in replica.log()
        second = await replica.gateway.terminal(http)
        await second.control("session")
        await second.expect(PROMPT)

        # A config that does not load changes nothing, and the gateway goes on serving.
        replica.config_path.write_text("this is not TOML [")
        replica.signal(signal.SIGHUP)
        await wait_for(lambda: "reload: configuration error, nothing changed" in replica.log(), what="the refusal")
        assert (await second.run("echo still-$((40+2))")).strip() == "still-42"

        # allowed_groups is live: from now on only members log in.
        rewrite(replica, state_dir, pam_service, session={"max_per_user": 2}, auth={"allowed_groups": ["termbridge-nobody"]})
        replica.signal(signal.SIGHUP)
        await wait_for(lambda: "reload: applied auth.allowed_groups" in replica.log(), what="the second reload")
        assert await replica.gateway.attempt_login(user.name, user.password) == 401
    assert replica.proc is not None and replica.proc.poll() is None


async def test_sighup_renews_the_tls_certificate(gateway_process, pam_service, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    cert, key = self_signed_cert(first)
    replica = gateway_process(web={"tls_cert": str(cert), "tls_key": str(key)})
    state_dir = state_dir_of(replica)
    log = open(str(replica.config_path) + ".log", "ab")
    replica.log_path = Path(log.name)
    replica.proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(replica.config_path)], cwd=ROOT, stderr=log,
        stdout=subprocess.DEVNULL,
    )

    def served() -> str | None:
        try:
            return ssl.get_server_certificate(("127.0.0.1", replica.port), timeout=2)
        except OSError:
            return None

    async def serving(pem: str) -> bool:
        assert replica.proc is not None and replica.proc.poll() is None, replica.log()[-2000:]
        return (await asyncio.to_thread(served) or "").strip() == pem.strip()

    await wait_for(lambda: serving(cert.read_text()), timeout=30, what="the first certificate")
    renewed, renewed_key = self_signed_cert(second)
    rewrite(replica, state_dir, pam_service, web={"tls_cert": str(renewed), "tls_key": str(renewed_key)})
    replica.signal(signal.SIGHUP)
    await wait_for(lambda: serving(renewed.read_text()), what="the renewed certificate")
    assert "reload: applied web.tls_cert, web.tls_key" in replica.log()
    log.close()


def test_every_live_key_is_a_key():
    from bridge.config import LIVE_KEYS, known_keys

    assert LIVE_KEYS <= set(known_keys())
    assert not {"web.listen", "ssh.listen", "store.url", "store.secret_file", "state_dir"} & LIVE_KEYS


def test_a_reload_takes_the_live_keys_only():
    from bridge.config import Config, apply_live, changed_keys
    from bridge.errors import ConfigError

    old = Config()
    new = dataclasses.replace(
        old,
        web=dataclasses.replace(old.web, listen=("0.0.0.0", 9)),
        session=dataclasses.replace(old.session, max_per_user=1, network="internet"),
    )
    assert changed_keys(old, new) == ["web.listen", "session.max_per_user", "session.network"]
    merged = apply_live(old, new)
    assert merged.session.max_per_user == 1
    assert (merged.web.listen, merged.session.network) == (old.web.listen, old.session.network)
    # A live key that would break a rule against a key that stays is refused as a whole.
    pooled = dataclasses.replace(old, session=dataclasses.replace(old.session, pool=10))
    with pytest.raises(ConfigError, match="session.pool"):
        apply_live(pooled, dataclasses.replace(pooled, session=dataclasses.replace(pooled.session, max_total=5, max_per_user=1)))


async def test_sessions_list_json_and_kill_by_user_across_the_fleet(gateway_process, redis_url, make_user, tmp_path):
    """`sessions list --json` is one array of objects with the same keys each, covering both
    gateways; `sessions kill --user` ends that user's sessions on every gateway and nobody
    else's, and says so in its exit status when it ended nothing."""
    from datetime import datetime

    from bridge.admin import SESSION_KEYS

    alice, bob = make_user(), make_user()
    replicas = await start_fleet(gateway_process, redis_url, tmp_path, count=2)
    clients = [await replicas[0].gateway.login(alice), await replicas[1].gateway.login(alice),
               await replicas[0].gateway.login(bob)]
    try:
        gateways = [replicas[0].gateway, replicas[1].gateway, replicas[0].gateway]
        terms = [await gateway.terminal(http) for gateway, http in zip(gateways, clients)]
        ids = [(await term.control("session"))["id"] for term in terms]
        for term in terms:
            await term.expect(PROMPT)

        code, out, err = await run_cli("sessions", "list", "--json", "--config", str(replicas[1].config_path))
        assert code == 0, err
        listing = json.loads(out)
        assert isinstance(listing, list)
        rows = {row["id"]: row for row in listing}
        assert set(ids) <= set(rows)
        for session_id, owner in zip(ids, (alice, alice, bob)):
            row = rows[session_id]
            assert tuple(row) == SESSION_KEYS
            assert (row["user"], row["door"], row["profile"]) == (owner.name, "web", "default")
            assert row["container"] == f"termbridge-{session_id[:8]}"
            assert datetime.fromisoformat(row["started"]).utcoffset() is not None  # RFC 3339, with its offset
            assert isinstance(row["idle_seconds"], (int, float)) and 0 <= row["idle_seconds"] < 120
        assert rows[ids[0]]["gateway"] == rows[ids[2]]["gateway"] != rows[ids[1]]["gateway"]

        code, out, err = await run_cli("sessions", "kill", "--user", alice.name, "--config", str(replicas[1].config_path))
        assert code == 0, err
        assert out.splitlines()[-1] == f"2 sessions of {alice.name} ended" and ids[0] in out and ids[1] in out
        for term in terms[:2]:
            exit_msg = await term.control("exit", timeout=10)
            assert exit_msg["reason"] == "killed" and "administrator" in exit_msg["message"]
        assert (await terms[2].run("echo bob-$((6*7))")).strip() == "bob-42"  # untouched
        for session_id in ids[:2]:
            await containers_gone(**{"termbridge.session": session_id})

        code, out, err = await run_cli("sessions", "kill", "--user", alice.name, "--config", str(replicas[0].config_path))
        assert code == 1 and f"no live session of {alice.name!r}" in err and not out
        code, out, err = await run_cli("sessions", "kill", "--user", "no-such-user-x", "--config", str(replicas[0].config_path))
        assert code == 1 and "no such user 'no-such-user-x'" in err
        code, out, _ = await run_cli("sessions", "list", "--json", "--config", str(replicas[0].config_path))
        assert code == 0 and [row["id"] for row in json.loads(out) if row["user"] in (alice.name, bob.name)] == [ids[2]]
        await terms[2].send("exit\r")
        await terms[2].control("exit")
    finally:
        for http in clients:
            await http.close()
    await containers_gone(**{"termbridge.session": ids[2]})
