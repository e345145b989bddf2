"""Logging in through the web door with real PAM accounts made for each test."""

from __future__ import annotations

import asyncio
import grp
import secrets
import subprocess

import aiohttp
import pytest
from yarl import URL

from bridge.auth import Outcome, PamAuthenticator, member_of
from bridge.web.login import COOKIE_NAME, LOGIN_FAILED
from helpers import assert_same_timing, csrf_token, refusal_times


async def post_login(gateway, username, password, origin=None, headers=None):
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        resp = await http.post(
            "/login", data={"username": username, "password": password, "csrf": await csrf_token(http)},
            headers={"Origin": origin or gateway.origin, **(headers or {})}, allow_redirects=False,
        )
        return resp.status, await resp.text(), resp.headers.getall("Set-Cookie", [])


async def test_correct_password_logs_in_with_a_safe_cookie(gateway, user):
    status, _, cookies = await post_login(gateway, user.name, user.password)
    assert status == 303
    [cookie] = [c for c in cookies if c.startswith(COOKIE_NAME + "=")]
    attrs = cookie.lower()
    assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain HTTP here; under TLS it is Secure


async def test_logged_in_page_and_redirect_when_not(gateway, user):
    async with aiohttp.ClientSession(base_url=gateway.url) as anon:
        resp = await anon.get("/", allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/login"
        resp = await anon.get("/login")
        assert resp.status == 200 and 'name="password"' in await resp.text()
        resp = await anon.get("/ws", headers={"Origin": gateway.origin})
        assert resp.status == 401
    async with await gateway.login(user) as http:
        resp = await http.get("/", allow_redirects=False)
        assert resp.status == 200 and "terminal.js" in await resp.text()


@pytest.mark.parametrize(
    "kind",
    ["wrong password", "unknown user", "locked", "expired", "nologin shell", "false shell", "empty password"],
)
async def test_refusals_look_the_same(gateway, make_user, kind):
    user = {
        "locked": lambda: make_user(locked=True),
        "expired": lambda: make_user(expired=True),
        "nologin shell": lambda: make_user(shell="/usr/sbin/nologin"),
        "false shell": lambda: make_user(shell="/bin/false"),
    }.get(kind, make_user)()
    name, password = user.name, user.password
    if kind == "wrong password":
        password = "not-" + password
    elif kind == "unknown user":
        name = "tbnobody" + secrets.token_hex(3)
    elif kind == "empty password":
        password = ""
    status, body, cookies = await post_login(gateway, name, password)
    assert status == 401
    assert LOGIN_FAILED in body
    assert not [c for c in cookies if c.startswith(COOKIE_NAME + "=")]


async def test_allowed_groups(start_gateway, make_user):
    group = "tbg" + secrets.token_hex(3)
    subprocess.run(["groupadd", group], check=True)
    try:
        gateway = await start_gateway(auth={"allowed_groups": [group]})
        member, outsider = make_user(groups=(group,)), make_user()
        assert (await post_login(gateway, member.name, member.password))[0] == 303
        status, body, _ = await post_login(gateway, outsider.name, outsider.password)
        assert status == 401 and LOGIN_FAILED in body
        assert group in [g.gr_name for g in grp.getgrall() if member.name in g.gr_mem]
    finally:
        subprocess.run(["groupdel", group], check=True)


async def test_cross_origin_login_and_socket_are_refused(gateway, user):
    status, _, _ = await post_login(gateway, user.name, user.password, origin="http://evil.example")
    assert status == 403
    async with await gateway.login(user) as http:
        resp = await http.get("/ws", headers={"Origin": "http://evil.example", "Connection": "Upgrade", "Upgrade": "websocket",
                                              "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert resp.status == 403


async def test_pam_runs_off_the_event_loop(gateway, user):
    """pam_unix delays a failure by ~2 s; the gateway keeps answering others meanwhile."""
    failing = asyncio.create_task(post_login(gateway, user.name, "wrong"))
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        resp = await http.get("/login")
        assert resp.status == 200
    assert not failing.done(), "the failed login returned before the page: PAM did not delay, or blocked the loop"
    assert (await failing)[0] == 401


async def test_account_checks_do_not_wait_behind_password_checks(pam_service, make_user):
    """With every password thread busy (wrong passwords: pam_unix delays each ~2 s), the
    password-less check a web session start makes still answers: it has threads of its own."""
    busy, other = make_user(), make_user()
    auth = PamAuthenticator(pam_service, workers=1)
    try:
        failing = [asyncio.create_task(auth.authenticate(busy.name, "wrong", "127.0.0.1")) for _ in range(2)]
        await asyncio.sleep(0.2)
        rechecked = await auth.recheck(other.name, "127.0.0.1")
        assert rechecked.ok and rechecked.user is not None and rechecked.user.name == other.name
        assert not any(f.done() for f in failing), "the password checks ended first: nothing was waited behind"
        assert [r.outcome for r in await asyncio.gather(*failing)] == [Outcome.DENIED, Outcome.DENIED]
    finally:
        auth.close()


async def test_logout_forgets_the_login_server_side(gateway, user):
    async with await gateway.login(user) as http:
        cookie = http.cookie_jar.filter_cookies(URL(gateway.url))[COOKIE_NAME].value
        term = await gateway.terminal(http)
        await term.control("session")
        token = await csrf_token(http, "/")
        resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": gateway.origin}, allow_redirects=False)
        assert resp.status == 303
        exit_msg = await term.control("exit")
        assert exit_msg["reason"] == "killed"
    async with aiohttp.ClientSession(base_url=gateway.url, cookies={COOKIE_NAME: cookie}) as replay:
        resp = await replay.get("/", allow_redirects=False)
        assert resp.status == 303  # the old cookie no longer logs anyone in


async def test_authenticator_unavailable_when_pam_service_is_broken(tmp_path, user):
    broken = "termbridge-broken-" + secrets.token_hex(3)
    path = f"/etc/pam.d/{broken}"
    with open(path, "w") as fh:
        fh.write("auth requisite pam_does_not_exist.so\naccount required pam_permit.so\n")
    auth = PamAuthenticator(broken)
    try:
        result = await auth.authenticate(user.name, user.password, "127.0.0.1")
        assert result.outcome is Outcome.UNAVAILABLE
        assert "code 28" in result.reason
    finally:
        auth.close()
        subprocess.run(["rm", "-f", path], check=True)


def test_the_log_scan_finds_planted_secrets():
    """The suite-wide check (conftest.no_secrets_in_logs) can fail: it spots each kind of secret."""
    import asyncssh

    from helpers import find_secrets, private_key_fragments

    key = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
    cookie_secret = bytes(range(32))
    lines = [
        "termbridge.auth INFO login denied for 'bob' from 127.0.0.1",
        "termbridge.web INFO oops pw-hunter2-xyz",
        f"termbridge.web INFO secret {cookie_secret.hex()}",
        f"asyncssh DEBUG {private_key_fragments(key)[1]}",
        "x INFO -----BEGIN OPENSSH PRIVATE KEY-----",
    ]
    found = find_secrets(lines, ["pw-hunter2-xyz", cookie_secret, *private_key_fragments(key)])
    assert len(found) == 4 and all("hunter2" not in line for line in found)


async def test_refusal_timing_does_not_tell_which_accounts_exist(start_gateway, make_user):
    """Unknown names and a nologin account are refused as slowly as a real account's wrong
    password (PAM's failure delay), so timing does not reveal who has an account."""
    gateway = await start_gateway(
        auth={"failure_window": 0.01, "pam_workers": 12}, web={"trusted_proxies": ["127.0.0.1"]}
    )
    known = [make_user() for _ in range(6)]
    nologin = make_user(shell="/usr/sbin/nologin")

    async def attempt(name: str, password: str, address: str) -> None:
        status, _, _ = await post_login(gateway, name, password, headers={"X-Forwarded-For": address})
        assert status == 401

    unknown = ["tbnobody" + secrets.token_hex(3) for _ in range(4)]
    wrong, refused = await refusal_times(attempt, known, [*unknown, nologin.name, nologin.name])
    assert_same_timing(wrong, refused)


async def test_member_of_reads_groups_afresh(make_user, make_group):
    """Admin and profile entitlements are asked at each request: `gpasswd -d` counts at once."""
    group, other = make_group(), make_group()
    member = make_user(groups=(group,))
    assert await member_of(member.name, (group,))
    assert await member_of(member.name, (other, group))
    assert not await member_of(member.name, (other,))
    assert not await member_of(member.name, ())
    assert not await member_of("tbnosuchuser", (group,))
    subprocess.run(["gpasswd", "-d", member.name, group], check=True, capture_output=True)
    assert not await member_of(member.name, (group,))
