"""The state store: one conformance suite run against SQLite (a file in state_dir) and a real
redis-server. Two Store objects on one backend stand for two gateway replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from bridge.config import Config, StoreConfig, load_config
from bridge.errors import ConfigError, StoreUnavailable
from bridge.store import LoginRecord, SessionRecord, SessionSecret, Store, open_store
from bridge.store.base import SecretBox
from helpers import ROOT, private_key_fragments
from testbed.redis_server import RedisServer

Replica = Callable[..., Awaitable[Store]]


def config_for(state_dir: Path, url: str = "", secret_file: Path | None = None) -> Config:
    return Config(state_dir=state_dir, store=StoreConfig(url=url, secret_file=secret_file))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(name, store.url) of the backend under test."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return request.param, url


@pytest.fixture
async def replica(backend: tuple[str, str], tmp_path: Path) -> AsyncIterator[Replica]:
    """Opens another gateway's view of the same store (closed after the test)."""
    opened: list[Store] = []

    async def open_one(secret_file: Path | None = None) -> Store:
        store = await open_store(config_for(tmp_path, backend[1], secret_file))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


def session(session_id: str, user: str = "alice", **fields: object) -> SessionRecord:
    now = time.time()
    base = SessionRecord(
        id=session_id, user=user, door="web", gateway="gw-a", started=now, last_activity=now,
        lifetime_deadline=now + 3600, container_id="c0ffee", container_name=f"tb-{session_id}",
        address="172.30.0.5", port=22, ssh_user=user,
    )
    return dataclasses.replace(base, **fields)


async def owners(store: Store) -> dict[str, str | None]:
    """Who holds each slot (None: a pooled container)."""
    return {slot_id: slot.user for slot_id, slot in (await store.list_slots()).items()}


def new_secret() -> SessionSecret:
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    return SessionSecret(client_key=client.export_private_key("openssh"), host_key=host.export_public_key("openssh"))


# -- sessions ------------------------------------------------------------------------------------


async def test_session_records_are_shared_and_updated_in_place(replica: Replica):
    a, b = await replica(), await replica()
    await a.put_session(session("s1"))
    await a.put_session(session("s2", user="bob", door="ssh", login=None))
    await a.put_session(session("s3", login="L1"))

    got = await b.get_session("s3")
    assert got == session("s3", login="L1", started=got.started, last_activity=got.last_activity,
                          lifetime_deadline=got.lifetime_deadline)
    assert [r.id for r in await b.list_sessions()] == ["s1", "s2", "s3"]
    assert [r.id for r in await b.list_sessions(user="alice")] == ["s1", "s3"]
    assert await b.list_sessions(user="nobody") == []

    assert await b.update_session("s1", last_activity=1234.5, attached_by="gw-b", attached_at=1234.0)
    rec = await a.get_session("s1")
    assert (rec.last_activity, rec.attached_by, rec.attached_at, rec.user) == (1234.5, "gw-b", 1234.0, "alice")
    assert await a.update_session("s1", attached_by=None, ended=True)
    rec = await b.get_session("s1")
    assert rec.attached_by is None and rec.ended
    assert not await a.update_session("gone", ended=True)
    assert await a.get_session("gone") is None
    with pytest.raises(ValueError, match="colour"):
        await a.update_session("s1", colour="red")
    with pytest.raises(ValueError, match="id"):
        await a.update_session("s1", id="s9")

    await a.put_secret("s1", new_secret())
    assert await a.reserve_slot("s1", "alice", 3, 10) is None
    await b.delete_session("s1")
    await b.delete_session("s1")  # idempotent
    assert await a.get_session("s1") is None
    assert await a.get_secret("s1") is None
    assert "s1" not in await a.list_slots()
    assert [r.id for r in await a.list_sessions()] == ["s2", "s3"]


async def test_concurrent_updates_of_different_fields_both_land(replica: Replica):
    a, b = await replica(), await replica()
    await a.put_session(session("s1"))
    await asyncio.gather(*(
        a.update_session("s1", last_activity=float(i)) if i % 2 else b.update_session("s1", attached_at=float(i))
        for i in range(40)
    ))
    rec = await a.get_session("s1")
    assert rec.last_activity % 2 == 1 and rec.attached_at % 2 == 0


async def test_attaching_is_compare_and_set(replica: Replica):
    """Two gateways race to take over a detached session: exactly one wins."""
    a, b = await replica(), await replica()
    await a.put_session(session("s1", attached_by=None, port=22))
    results = await asyncio.gather(*(
        (a if i % 2 else b).update_session("s1", expect={"attached_by": None}, attached_by=f"gw{i}", attached_at=1.0)
        for i in range(20)
    ))
    assert results.count(True) == 1
    winner = f"gw{results.index(True)}"
    assert (await b.get_session("s1")).attached_by == winner
    assert not await a.update_session("s1", expect={"attached_by": "gw-other"}, attached_by=None)
    expected = {"attached_by": winner, "port": 22.0, "attached_at": 1}  # numbers compare as numbers
    assert await a.update_session("s1", expect=expected, attached_by=None)
    assert (await b.get_session("s1")).attached_by is None
    assert await a.update_session("s1", expect={"attached_by": None})  # a pure check
    assert not await a.update_session("gone", expect={"attached_by": None}, attached_by="gw0")
    with pytest.raises(ValueError, match="colour"):
        await a.update_session("s1", expect={"colour": "red"}, ended=True)


# -- slots (caps) --------------------------------------------------------------------------------


async def test_max_total_holds_across_replicas_under_concurrency(replica: Replica):
    a, b = await replica(), await replica()
    results = await asyncio.gather(*(
        (a if i % 2 else b).reserve_slot(f"s{i}", f"user{i % 10}", 5, 20) for i in range(50)
    ))
    assert results.count(None) == 20
    assert set(results) == {None, "max_total"}
    slots = await a.list_slots()
    assert len(slots) == 20 and slots == await b.list_slots()
    assert max(Counter((await owners(a)).values()).values()) <= 5


async def test_max_per_user_holds_across_replicas_under_concurrency(replica: Replica):
    a, b = await replica(), await replica()
    results = await asyncio.gather(*(
        (a if i % 2 else b).reserve_slot(f"s{i}", "alice" if i < 50 else "bob", 3, 100) for i in range(60)
    ))
    assert results[:50].count(None) == 3 and set(results[:50]) == {None, "max_per_user"}
    assert results[50:].count(None) == 3
    assert Counter((await owners(b)).values()) == {"alice": 3, "bob": 3}


RESERVE_IN_A_PROCESS = """
import asyncio, json, sys, time
from pathlib import Path
from bridge.config import Config, StoreConfig
from bridge.store import open_store

async def main(state_dir, url, name, go):
    store = await open_store(Config(state_dir=Path(state_dir), store=StoreConfig(url=url)))
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    results = await asyncio.gather(*(
        store.reserve_slot(f"{name}-{i}", "alice" if i % 2 else f"{name}-user{i}", 7, 40) for i in range(60)
    ))
    await store.close()
    print(json.dumps(results))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_caps_hold_across_gateway_processes(backend: tuple[str, str], replica: Replica, tmp_path: Path):
    """Four real processes (the gateways of one host, or of several hosts on one Redis) start
    together on an empty state_dir (one key file, one schema come out of it), then reserve 240
    slots at the same moment: exactly max_total are granted, alice gets exactly max_per_user."""
    go = tmp_path / "go"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", RESERVE_IN_A_PROCESS, str(tmp_path), backend[1], f"gw{n}", str(go),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for n in range(4)
    ]
    for proc in procs:  # each has opened its store and waits
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    go.touch()
    store = await replica()
    results = []
    for proc in procs:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        results += json.loads(out)
    assert results.count(None) == 40
    slots = await owners(store)
    assert len(slots) == 40
    assert Counter(slots.values())["alice"] == 7


async def test_slots_are_idempotent_and_released(replica: Replica):
    a, b = await replica(), await replica()
    assert await a.reserve_slot("s1", "alice", 1, 2) is None
    assert await b.reserve_slot("s1", "alice", 1, 2) is None  # a retry of the same session
    assert await b.reserve_slot("s2", "alice", 1, 2) == "max_per_user"
    assert await b.reserve_slot("s2", "bob", 1, 2) is None
    assert await a.reserve_slot("s3", "carol", 1, 2) == "max_total"
    await b.release_slot("s1")
    await b.release_slot("s1")
    assert await a.reserve_slot("s3", "carol", 1, 2) is None
    assert await a.reserve_slot("s4", "alice", 1, 3) is None  # alice's count went down with s1
    assert await owners(a) == {"s2": "bob", "s3": "carol", "s4": "alice"}


async def test_pooled_containers_count_against_the_total_and_are_claimed(replica: Replica):
    a, b = await replica(), await replica()
    before = time.time()
    assert await a.reserve_slot("pool-1", None, 1, 3) is None
    assert before <= (await b.list_slots())["pool-1"].since <= time.time()
    assert await a.reserve_slot("pool-2", None, 1, 3) is None
    assert await b.reserve_slot("s1", "alice", 1, 3) is None
    assert await b.reserve_slot("s2", "bob", 1, 3) == "max_total"
    await asyncio.sleep(0.01)
    assert await b.claim_slot("pool-1", "s2", "bob", 1, 3) is None
    slots = await a.list_slots()
    assert slots["s2"].since > slots["pool-2"].since  # a claimed slot is held since the claim
    assert await a.claim_slot("pool-2", "s3", "alice", 1, 3) == "max_per_user"
    assert await owners(a) == {"pool-2": None, "s1": "alice", "s2": "bob"}
    assert await a.claim_slot("pool-1", "s2", "bob", 1, 3) is None  # a retry changes nothing
    await a.release_slot("pool-2")
    # the pooled slot is already gone (reaped): the claim is a plain reservation
    assert await a.claim_slot("pool-2", "s4", "carol", 1, 3) is None
    assert await a.claim_slot("pool-9", "s5", "dave", 1, 3) == "max_total"
    assert await owners(b) == {"s1": "alice", "s2": "bob", "s4": "carol"}


async def test_concurrent_claims_of_one_pooled_slot_keep_the_total(replica: Replica):
    a, b = await replica(), await replica()
    assert await a.reserve_slot("pool-1", None, 5, 4) is None
    for i in range(3):
        assert await a.reserve_slot(f"x{i}", f"u{i}", 5, 4) is None
    results = await asyncio.gather(*(
        (a if i % 2 else b).claim_slot("pool-1", f"s{i}", "alice", 5, 4) for i in range(10)
    ))
    assert results.count(None) == 1
    assert len(await a.list_slots()) == 4


# -- logins --------------------------------------------------------------------------------------


async def test_logins_are_valid_on_every_replica_until_logout(replica: Replica):
    a, b = await replica(), await replica()
    now = time.time()
    await a.put_login(LoginRecord("L1", "alice", 1001, 1001, now + 600))
    await a.put_login(LoginRecord("L2", "alice", 1001, 1001, now + 900))
    await a.put_login(LoginRecord("L3", "bob", 1002, 1002, now + 600))
    assert await b.get_login("L1", now) == LoginRecord("L1", "alice", 1001, 1001, now + 600)
    assert await b.get_login("L1", now + 601) is None  # expired
    assert await b.get_login("nope", now) is None
    await a.put_login(LoginRecord("L0", "alice", 1001, 1001, now - 1))  # already expired
    assert await b.get_login("L0", now) is None

    await b.delete_login("L1")
    assert await a.get_login("L1", now) is None and await b.get_login("L1", now) is None
    await a.put_login(LoginRecord("L4", "alice", 1001, 1001, now + 60))
    assert await b.delete_logins_of("alice") == 2
    for store in (a, b):
        assert await store.get_login("L2", now) is None and await store.get_login("L4", now) is None
        assert (await store.get_login("L3", now)).user == "bob"


async def test_profile_choices_are_per_user_shared_and_replaced(replica: Replica):
    a, b = await replica(), await replica()
    assert await b.get_profile_choice("alice") is None
    await a.put_profile_choice("alice", "gpu")
    await a.put_profile_choice("bob", "course")
    assert await b.get_profile_choice("alice") == "gpu"
    await b.put_profile_choice("alice", "small")
    assert (await a.get_profile_choice("alice"), await a.get_profile_choice("bob")) == ("small", "course")


# -- throttle counters ---------------------------------------------------------------------------


async def test_failures_add_up_across_replicas_and_age_out(replica: Replica):
    a, b = await replica(), await replica()
    now = time.time()
    assert await a.add_failure("user:alice", now, 900) == 1
    assert await b.add_failure("user:alice", now + 1, 900) == 2
    counts = await asyncio.gather(*((a if i % 2 else b).add_failure("user:alice", now + 2, 900) for i in range(10)))
    assert sorted(counts) == list(range(3, 13))
    assert await a.failures("user:alice", now + 2, 900) == 12
    assert await b.failures("user:alice", now + 901.5, 900) == 10  # the first two aged out
    assert await b.add_failure("user:alice", now + 903, 900) == 1
    assert await a.failures("addr:10.0.0.1", now, 900) == 0
    await a.clear("user:alice")
    assert await b.failures("user:alice", now + 903, 900) == 0


async def test_locks_are_shared_and_only_ever_extended(replica: Replica):
    a, b = await replica(), await replica()
    now = time.time()
    assert await a.locked_until("addr:10.0.0.1", now) is None
    await a.lock("addr:10.0.0.1", now + 300)
    assert await b.locked_until("addr:10.0.0.1", now) == pytest.approx(now + 300)
    await b.lock("addr:10.0.0.1", now + 10)  # a late, shorter lock from another replica
    assert await a.locked_until("addr:10.0.0.1", now) == pytest.approx(now + 300)
    assert await a.locked_until("addr:10.0.0.1", now + 301) is None
    await b.clear("addr:10.0.0.1")
    assert await a.locked_until("addr:10.0.0.1", now) is None


async def test_a_flood_of_other_keys_never_releases_a_lockout(replica: Replica):
    a, b = await replica(), await replica()
    now = time.time()
    await a.lock("user:alice", now + 600)
    await a.add_failure("user:alice", now, 900)
    for start in range(0, 3000, 500):  # 3000 keys, later ones past the purge interval
        t = now + start / 10
        await asyncio.gather(*(
            (a if i % 2 else b).add_failure(f"addr:10.{i}.0.1", t, 900) for i in range(start, start + 500)
        ))
        await b.lock(f"addr:10.{start}.0.1", t + 1)
    assert await b.locked_until("user:alice", now + 400) == pytest.approx(now + 600)
    assert await b.failures("user:alice", now + 400, 900) == 1


# -- reconnect secrets ---------------------------------------------------------------------------


async def test_secrets_reach_every_replica_and_a_wrong_key_file_is_refused(replica: Replica, tmp_path: Path):
    a, b = await replica(), await replica()
    secret = new_secret()
    await a.put_secret("s1", secret)
    assert await b.get_secret("s1") == secret
    assert await b.get_secret("s2") is None
    sealed, host_key = await a._get_secret("s1")  # someone with write access moves an entry
    await a._put_secret("s2", sealed, host_key)
    with pytest.raises(StoreUnavailable, match="does not decrypt"):
        await b.get_secret("s2")
    other = tmp_path / "other-key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with pytest.raises(ConfigError, match="store.secret_file"):
        await replica(other)


def test_the_key_file_is_private_and_well_formed(tmp_path: Path):
    path = tmp_path / "store-key"
    SecretBox.from_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="open to group or others"):
        SecretBox.from_file(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="32 bytes"):
        SecretBox.from_file(path)


async def test_a_closed_store_says_so(backend: tuple[str, str], tmp_path: Path):
    store = await open_store(config_for(tmp_path, backend[1]))
    await store.close()
    await store.close()  # idempotent
    for call in (store.ping(), store.get_session("s1"), store.reserve_slot("s1", "alice", 1, 1)):
        with pytest.raises(StoreUnavailable, match="closed"):
            await call


# -- SQLite specifics ----------------------------------------------------------------------------


def sqlite_files(state_dir: Path) -> list[Path]:
    return [p for p in (state_dir / "state.db", state_dir / "state.db-wal", state_dir / "state.db-shm") if p.exists()]


async def test_sqlite_state_survives_a_restart_and_stays_private(tmp_path: Path):
    tmp_path.chmod(0o700)
    config = config_for(tmp_path)
    secret = new_secret()
    now = time.time()
    store = await open_store(config)
    await store.put_session(session("s1"))
    await store.put_secret("s1", secret)
    assert await store.reserve_slot("s1", "alice", 3, 10) is None
    await store.put_login(LoginRecord("L1", "alice", 1001, 1001, now + 600))
    await store.lock("user:bob", now + 300)

    files = sqlite_files(tmp_path)
    assert {p.name for p in files} >= {"state.db", "state.db-wal"}
    on_disk = b"".join(p.read_bytes() for p in files)
    assert b"c0ffee" in on_disk  # the check below looks at the real bytes
    assert not [f for f in private_key_fragments(secret.client_key) if f.encode() in on_disk]
    for path in [*files, tmp_path / "store-key"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    await store.close()

    store = await open_store(config)
    try:
        assert (await store.get_session("s1")).container_id == "c0ffee"
        assert await store.get_secret("s1") == secret
        assert await owners(store) == {"s1": "alice"}
        assert (await store.get_login("L1", now)).user == "alice"
        assert await store.locked_until("user:bob", now) == pytest.approx(now + 300)
    finally:
        await store.close()


async def test_sqlite_purges_expired_entries(tmp_path: Path):
    store = await open_store(config_for(tmp_path))
    now = time.time()
    try:
        await store.put_login(LoginRecord("old", "alice", 1, 1, now - 1))
        await store.put_login(LoginRecord("new", "alice", 1, 1, now + 600))
        for i in range(100):
            await store.add_failure(f"addr:{i}", now, 60)
        await store.lock("addr:0", now + 30)
        await store.add_failure("addr:x", now + 61, 60)  # past the window and the purge interval
        await store.add_failure("addr:y", now + 100, 60)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT id FROM logins").fetchall() == [("new",)]
        assert db.execute("SELECT key FROM failures ORDER BY key").fetchall() == [("addr:x",), ("addr:y",)]
        assert db.execute("SELECT key FROM locks").fetchall() == []


async def test_sqlite_unreachable_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(StoreUnavailable) as info:
        await open_store(config_for(tmp_path / "missing", secret_file=tmp_path / "store-key"))
    assert "state database" in info.value.detail and "missing" in info.value.detail
    assert "try again later" in info.value.user_message
    (tmp_path / "state.db").write_bytes(b"not a database, " * 1000)
    with pytest.raises(StoreUnavailable, match="not a database"):
        await open_store(config_for(tmp_path))


# -- Redis specifics -----------------------------------------------------------------------------


async def test_redis_dump_does_not_hold_session_keys(redis_url: str, redis_server: RedisServer, tmp_path: Path):
    store = await open_store(config_for(tmp_path, redis_url))
    secret = new_secret()
    try:
        await store.put_session(session("s1"))
        await store.put_secret("s1", secret)
        dump = redis_server.dump()
    finally:
        await store.close()
    assert b"c0ffee" in dump and secret.host_key in dump  # an uncompressed dump: plain text shows
    assert not [f for f in private_key_fragments(secret.client_key) if f.encode() in dump]


async def test_redis_entries_expire_on_their_own(redis_url: str, redis_server: RedisServer, tmp_path: Path):
    store = await open_store(config_for(tmp_path, redis_url))
    now = time.time()
    try:
        await store.put_login(LoginRecord("L1", "alice", 1, 1, now + 0.5))
        await store.add_failure("addr:10.0.0.1", now, 0.5)
        await store.lock("addr:10.0.0.1", now + 0.5)
        keys_before = int(redis_server.command("DBSIZE")[1:])
        # what is left: the key check and nothing that grows with traffic
        deadline = time.monotonic() + 10
        while redis_server.command("DBSIZE") != ":1" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert keys_before >= 4 and redis_server.command("DBSIZE") == ":1"
        await store.put_login(LoginRecord("L2", "alice", 1, 1, now + 600))
        await store.put_login(LoginRecord("L3", "bob", 1, 1, now + 600))
        await store.delete_login("L2")
        await store.delete_logins_of("bob")
        assert await store.reserve_slot("pool-1", None, 1, 1) is None
        assert await store.claim_slot("pool-1", "s1", "alice", 1, 1) is None
        await store.put_session(session("s1"))
        await store.put_secret("s1", new_secret())
        await store.delete_session("s1")
        assert redis_server.command("DBSIZE") == ":1"  # logout and session end leave nothing behind
    finally:
        await store.close()


async def test_redis_outage_is_store_unavailable_and_heals(tmp_path: Path):
    server = RedisServer().start()
    try:
        store = await open_store(config_for(tmp_path, server.url))
        await store.put_session(session("s1"))
        server.stop()
        started = time.monotonic()
        for call in (store.ping(), store.get_session("s1"), store.reserve_slot("s2", "alice", 3, 10)):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert info.value.user_message == "the gateway's state store is unavailable right now, try again later"
            assert f"redis://127.0.0.1:{server.port}/0" in info.value.detail
        assert time.monotonic() - started < 15
        server.start()  # empty again: --save ''
        await store.ping()
        assert await store.get_session("s1") is None
        await store.close()
    finally:
        server.close()


async def test_redis_down_at_start_and_password_kept_out_of_messages(tmp_path: Path):
    server = RedisServer()  # never started: nothing listens
    with pytest.raises(StoreUnavailable) as info:
        await open_store(config_for(tmp_path, f"redis://:hunter2secret@127.0.0.1:{server.port}/3"))
    assert f"redis://127.0.0.1:{server.port}/3" in info.value.detail
    assert "hunter2secret" not in str(info.value) + info.value.detail
    server.close()


async def test_redis_password(tmp_path: Path):
    server = RedisServer("--requirepass", "s3cret-pw").start()
    try:
        store = await open_store(config_for(tmp_path, f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"))
        await store.put_login(LoginRecord("L1", "alice", 1, 1, time.time() + 60))
        await store.close()
        for url in (f"redis://:wrong-pw@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0"):
            with pytest.raises(StoreUnavailable) as info:
                await open_store(config_for(tmp_path, url))
            detail = info.value.detail.lower()
            assert ("auth" in detail or "password" in detail) and f"127.0.0.1:{server.port}" in detail, detail
            assert "s3cret" not in detail and "wrong-pw" not in detail
    finally:
        server.close()


# -- configuration -------------------------------------------------------------------------------


def test_store_config_keys(tmp_path: Path):
    empty = tmp_path / "t.toml"
    empty.write_text("")
    config = load_config(empty, env={"TERMBRIDGE_STORE_URL": "redis://10.0.0.2:6379/1"})
    assert config.store.url == "redis://10.0.0.2:6379/1"
    assert load_config(empty, env={}).store_secret_file == Path("/var/lib/termbridge/store-key")
    assert load_config(empty, env={"TERMBRIDGE_STORE_SECRET_FILE": "/etc/tb/k"}).store_secret_file == Path("/etc/tb/k")
    assert load_config(empty, env={"TERMBRIDGE_STORE_URL": "unix:///run/redis.sock?db=2"}).store.url
    for bad in ("mysql://x", "redis://host:port/0", "redis://host:99999/0", "redis://", "127.0.0.1:6379"):
        with pytest.raises(ConfigError, match="store.url"):
            load_config(empty, env={"TERMBRIDGE_STORE_URL": bad})


def test_the_store_benchmark_runs(tmp_path: Path):
    """`python -m benchmarks.store_ops` measures both backends (no speed is asserted)."""
    out = tmp_path / "store.json"
    subprocess.run([sys.executable, "-m", "benchmarks.store_ops", "--ops", "60", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=120, capture_output=True)
    results = json.loads(out.read_text())
    assert set(results) == {"sqlite", "redis"}
    assert all(rate > 0 for backend in results.values() for rate in backend.values())
    assert len(results["redis"]) == 6
