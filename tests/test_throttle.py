"""Login throttling: the bookkeeping with a fake clock over a real store, then through PAM and the
web door for real (and across gateways sharing a store: test_fleet.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from bridge import throttle as throttle_mod
from bridge.auth import Outcome, PamAuthenticator
from bridge.config import AuthConfig
from bridge.store import Store
from bridge.store.base import SecretBox
from bridge.store.sqlite import SqliteStore
from bridge.throttle import MAX_DELAY, MAX_PENDING, MAX_QUEUED, LoginThrottle, ThrottledAuthenticator, address_key
from bridge.web.login import COOKIE_NAME
from helpers import csrf_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[Store]:
    """A real store (SQLite; the same counters as Redis, see test_store.py) for the bookkeeping."""
    opened = await SqliteStore.open(tmp_path / "state.db", SecretBox(os.urandom(32)))
    yield opened
    await opened.close()


@pytest.fixture
def make(store: Store) -> Callable[..., tuple[LoginThrottle, Clock]]:
    def make(**values: Any) -> tuple[LoginThrottle, Clock]:
        clock = Clock()
        config = AuthConfig(**{"max_failures": 5, "max_failures_per_address": 20, "failure_window": 900.0,
                               "lockout": 300.0, **values})
        return LoginThrottle(config, store, clock=clock), clock

    return make


async def test_failures_get_slower_then_lock_out_for_the_cooldown(make):
    t, clock = make()
    assert (await t.check("alice", "192.0.2.1")).delay == 0
    delays = []
    for _ in range(4):
        await t.failure("alice", "192.0.2.1")
        decision = await t.check("alice", "192.0.2.1")
        assert decision.allowed
        delays.append(decision.delay)
    assert delays == [1, 2, 4, MAX_DELAY]
    await t.failure("alice", "192.0.2.1")  # the fifth
    refused = await t.check("alice", "198.51.100.1")  # from anywhere: the username is locked
    assert not refused.allowed and refused.retry_after == 300
    clock.now += 299
    assert not (await t.check("alice", "192.0.2.1")).allowed
    clock.now += 2  # cooldown over: one more try, slowly
    again = await t.check("alice", "192.0.2.1")
    assert again.allowed and again.delay == MAX_DELAY
    await t.failure("alice", "192.0.2.1")
    assert not (await t.check("alice", "192.0.2.1")).allowed  # still 5+ failures in the window: locked again
    clock.now += 901  # the window forgets them all
    assert await t.check("alice", "192.0.2.1") == throttle_mod.Decision(True)


async def test_addresses_and_usernames_count_separately(make):
    t, _ = make(max_failures=100, max_failures_per_address=3)
    for name in ("u1", "u2", "u3"):
        await t.failure(name, "192.0.2.7")
    assert not (await t.check("someone-else", "192.0.2.7")).allowed  # the address guessed too much
    assert (await t.check("someone-else", "192.0.2.8")).allowed


async def test_success_clears_the_username_but_not_the_address(make):
    t, _ = make(max_failures_per_address=4)
    for _ in range(3):
        await t.failure("bob", "192.0.2.9")
    await t.success("bob", "192.0.2.9")
    assert (await t.check("bob", "198.51.100.2")).delay == 0
    await t.failure("carol", "192.0.2.9")
    assert not (await t.check("dave", "192.0.2.9")).allowed


def test_ipv6_counts_by_prefix():
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key(None) == "-"


async def test_attempts_in_flight_per_username_are_bounded_and_per_address_wait_in_line(make):
    t, _ = make()
    for i in range(MAX_PENDING):
        assert t.busy(f"x{i}", "192.0.2.3") is None
        assert t.begin(f"x{i}", "192.0.2.3") is None  # goes on at once
    assert t.busy("y", "192.0.2.3") is None  # a fourth from the address waits in line
    turn = t.begin("y", "192.0.2.3")
    assert turn is not None and not turn.done()
    assert t.begin("z", "192.0.2.4") is None  # another address is not held up
    t.end("x0", "192.0.2.3")
    assert turn.done()  # the first in line took the place
    for i in range(MAX_PENDING):  # one name from many addresses: refused, not queued
        t.begin("victim", f"198.51.100.{i}")
    assert t.busy("victim", "198.51.100.99") is not None


async def test_the_line_of_one_address_is_first_come_first_served_and_bounded(make):
    t, _ = make()
    for i in range(MAX_PENDING):
        t.begin(f"a{i}", "192.0.2.5")
    waiting = [asyncio.create_task(t.wait_turn(f"w{i}", "192.0.2.5", t.begin(f"w{i}", "192.0.2.5")))
               for i in range(MAX_QUEUED)]
    refused = t.busy("late", "192.0.2.5")
    assert refused is not None and "waiting" in refused.why
    await asyncio.sleep(0)
    waiting[0].cancel()  # its client went away while in line: it leaves the line
    await asyncio.gather(waiting[0], return_exceptions=True)
    t.end("a0", "192.0.2.5")
    await asyncio.sleep(0)
    assert [w.done() for w in waiting[1:4]] == [True, False, False]  # the next one, in order
    t.end("a1", "192.0.2.5")
    await asyncio.sleep(0)
    assert waiting[2].done() and not waiting[3].done()
    for task in waiting[3:]:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for name in ("a2", "w1", "w2"):
        t.end(name, "192.0.2.5")
    assert not t._pending and not t._waiting  # everything counted is released


async def test_gateways_sharing_a_store_count_together(make):
    """Two gateways' throttles over one store: failures on either lock the name out on both."""
    first, _ = make(max_failures=4)
    second, _ = make(max_failures=4)
    for throttle in (first, second, first, second):
        await throttle.failure("erin", "192.0.2.20")
    assert not (await first.check("erin", "198.51.100.3")).allowed
    assert not (await second.check("erin", "198.51.100.3")).allowed


async def test_a_store_that_does_not_answer_refuses_logins_before_pam(pam_service, make_user, store, caplog):
    user = make_user()
    auth = ThrottledAuthenticator(PamAuthenticator(pam_service), LoginThrottle(AuthConfig(), store))
    await store.close()
    try:
        with caplog.at_level(logging.INFO, logger="termbridge"):
            result = await auth.authenticate(user.name, user.password, "192.0.2.51")
        assert result.outcome is Outcome.UNAVAILABLE
        assert not [r for r in caplog.records if r.name == "termbridge.auth"], "PAM was asked"
        assert any("refused" in r.getMessage() and "store" in r.getMessage() for r in caplog.records)
    finally:
        auth.close()


# -- through PAM ------------------------------------------------------------------------------


async def test_the_door_api_refuses_before_pam(pam_service, make_user, store, caplog):
    """What the SSH door calls: THROTTLED with retry_after, and PAM is not asked."""
    alice, bob = make_user(), make_user()
    auth = ThrottledAuthenticator(PamAuthenticator(pam_service), LoginThrottle(AuthConfig(max_failures=2, lockout=60.0), store))
    try:
        for _ in range(2):
            assert (await auth.authenticate(alice.name, "wrong", "192.0.2.50")).outcome is Outcome.DENIED
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="termbridge"):
            result = await auth.authenticate(alice.name, alice.password, "192.0.2.50")
        assert result.outcome is Outcome.THROTTLED and 0 < result.retry_after <= 60
        assert not [r for r in caplog.records if r.name == "termbridge.auth"], "PAM was asked"
        assert (await auth.authenticate(bob.name, bob.password, "192.0.2.50")).ok
    finally:
        auth.close()


async def post(gateway, username, password, forwarded_for=None, proto=None):
    # behind a TLS proxy, the browser's origin is the https one
    headers = {"Origin": gateway.origin.replace("http:", "https:") if proto == "https" else gateway.origin}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    if proto:
        headers["X-Forwarded-Proto"] = proto
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        token = await csrf_token(http)
        async with http.post("/login", data={"username": username, "password": password, "csrf": token},
                             headers=headers, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp.headers


async def test_web_door_answers_429_after_repeated_failures(start_gateway, make_user):
    gateway = await start_gateway(auth={"max_failures": 2, "lockout": "60s"})
    alice, bob = make_user(), make_user()
    assert (await post(gateway, alice.name, "wrong"))[0] == 401
    assert (await post(gateway, alice.name, "wrong"))[0] == 401
    status, body, headers = await post(gateway, alice.name, alice.password)
    assert status == 429
    assert 0 < int(headers["Retry-After"]) <= 60
    assert "Too many failed logins" in body and 'name="password"' in body
    assert COOKIE_NAME not in headers.get("Set-Cookie", "")
    assert (await post(gateway, bob.name, bob.password))[0] == 303  # others log in as usual


async def test_a_flood_of_wrong_passwords_does_not_starve_others(start_gateway, make_user, caplog):
    """30 parallel wrong passwords from one address: only a handful reach PAM; another person,
    from another address, logs in meanwhile. (Addresses come via a trusted proxy header.)"""
    gateway = await start_gateway(auth={"pam_workers": 2}, web={"trusted_proxies": ["127.0.0.1"]})
    victim, other = make_user(), make_user()
    with caplog.at_level(logging.INFO, logger="termbridge"):
        flood = [asyncio.create_task(post(gateway, victim.name, f"guess{i}", "203.0.113.66")) for i in range(30)]
        await asyncio.sleep(0.3)
        status, _, _ = await post(gateway, other.name, other.password, "203.0.113.77")
        statuses = [s for s, _, _ in await asyncio.gather(*flood)]
    assert status == 303
    assert statuses.count(429) >= 20 and set(statuses) <= {401, 429}, statuses
    asked = [r for r in caplog.records if r.name == "termbridge.auth" and "203.0.113.66" in r.getMessage()]
    assert len(asked) <= 5 + MAX_PENDING, [r.getMessage() for r in asked]


async def test_a_class_behind_one_address_logs_in_at_once(start_gateway, make_user):
    """Twelve people behind one NAT address log in in the same instant: they wait in line for
    PAM (no more than MAX_PENDING of them in it at a time) instead of being refused."""
    gateway = await start_gateway(auth={"pam_workers": 2}, web={"trusted_proxies": ["127.0.0.1"]})
    users = [make_user() for _ in range(12)]
    statuses = [s for s, _, _ in await asyncio.gather(*(post(gateway, u.name, u.password, "203.0.113.9") for u in users))]
    assert statuses == [303] * 12, statuses


async def test_forwarded_headers_count_only_from_trusted_proxies(start_gateway, make_user):
    user = make_user()
    untrusting = await start_gateway(auth={"max_failures": 100, "max_failures_per_address": 2, "lockout": "60s"})
    for fake in ("198.51.100.1", "198.51.100.2"):
        assert (await post(untrusting, user.name, "wrong", forwarded_for=fake))[0] == 401
    # the header was ignored: the real address (loopback) is the one locked out
    assert (await post(untrusting, user.name, user.password, forwarded_for="198.51.100.3"))[0] == 429

    trusting = await start_gateway(auth={"max_failures": 100, "max_failures_per_address": 2, "lockout": "60s"},
                                   web={"trusted_proxies": ["127.0.0.0/8"]})
    for _ in range(2):
        assert (await post(trusting, user.name, "wrong", forwarded_for="198.51.100.1"))[0] == 401
    assert (await post(trusting, user.name, user.password, forwarded_for="198.51.100.1"))[0] == 429
    status, _, headers = await post(trusting, user.name, user.password, forwarded_for="198.51.100.2", proto="https")
    assert status == 303
    cookie = [c for c in headers.getall("Set-Cookie") if c.startswith(COOKIE_NAME)][0].lower()
    assert "secure" in cookie and "max-age=31536000" in headers["Strict-Transport-Security"]
    status, _, headers = await post(untrusting, make_user().name, "x", proto="https")
    assert "Strict-Transport-Security" not in headers


@pytest.fixture
def rhost_pam_service(tmp_path):
    """A PAM service that records PAM_RHOST (pam_exec), then the shipped stack."""
    record = tmp_path / "rhosts"
    script = tmp_path / "record-rhost"
    script.write_text(f"#!/bin/sh\necho \"$PAM_RHOST\" >> {record}\n")
    script.chmod(stat.S_IRWXU)
    name = f"termbridge-rhost-{os.getpid()}"
    path = f"/etc/pam.d/{name}"
    with open(path, "w") as fh:
        fh.write(f"auth optional pam_exec.so quiet {script}\n@include common-auth\naccount include common-account\n")
    yield name, record
    os.unlink(path)


async def test_pam_sees_the_real_client_address(start_gateway, make_user, rhost_pam_service):
    service, record = rhost_pam_service
    user = make_user()
    direct = await start_gateway(auth={"pam_service": service})
    proxied = await start_gateway(auth={"pam_service": service}, web={"trusted_proxies": ["127.0.0.1"]})
    assert (await post(direct, user.name, user.password, forwarded_for="198.51.100.5"))[0] == 303
    assert (await post(proxied, user.name, user.password, forwarded_for="192.0.2.99, 198.51.100.5"))[0] == 303
    assert record.read_text().split() == ["127.0.0.1", "198.51.100.5"]


async def test_a_flood_of_new_names_and_addresses_never_releases_a_lockout(make):
    t, clock = make(max_failures=2, max_failures_per_address=2)
    for _ in range(2):
        await t.failure("alice", "192.0.2.1")
    assert not (await t.check("alice", "198.51.100.1")).allowed
    for i in range(500):  # new names from new addresses, each with one failure
        clock.now += 0.01
        await t.failure(f"flood{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    refused = await t.check("alice", "198.51.100.1")
    assert not refused.allowed and refused.why == "user locked out"
    assert not (await t.check("bob", "192.0.2.1")).allowed  # the address lockout holds too


async def test_a_flood_through_the_web_door_does_not_release_a_lockout(start_gateway, make_user):
    """Lock alice out, then 80 logins under new names from 80 addresses (via a trusted proxy):
    alice's right password is still refused."""
    gateway = await start_gateway(
        auth={"max_failures": 2, "lockout": "10m", "pam_workers": 32}, web={"trusted_proxies": ["127.0.0.1"]}
    )
    alice = make_user()
    for _ in range(2):
        assert (await post(gateway, alice.name, "wrong", "192.0.2.10"))[0] == 401
    flood = [post(gateway, f"flood{i}", "x", f"10.1.{i // 250}.{i % 250}") for i in range(80)]
    statuses = [s for s, _, _ in await asyncio.gather(*flood)]
    assert set(statuses) <= {401, 429}
    status, _, _ = await post(gateway, alice.name, alice.password, "198.51.100.20")
    assert status == 429
