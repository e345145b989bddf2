"""The admin console (/admin) for members of `auth.admin_groups`, against a real gateway, real PAM
accounts and groups, real containers and Docker's own stats: who may use it (asked again at every
request and every refresh), ending sessions (CSRF, Origin, audit), the recordings, the SSH door's
`sessions` command with the real `ssh` client, and the whole thing in Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from bridge.app import INSTANCE
from bridge.backends.base import ContainerStats, cpu_percent
from bridge.web.watch import NOT_ADMIN
from bridge.web.keys import BACKEND, MANAGER
from helpers import Terminal, containers_gone, csrf_token, session_containers, wait_for

CONSOLE_URLS = ["/admin", "/admin/recording?session=" + "0" * 32, "/admin/play?session=" + "0" * 32]


def audit_events(path: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == name]


async def open_terminal(gateway, http: aiohttp.ClientSession) -> Terminal:
    ws = await http.ws_connect("/ws", headers={"Origin": gateway.origin})
    term = Terminal(ws)
    await term.control("session")
    await term.expect(b"$ ")
    return term


async def console_socket(gateway, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect("/admin/ws", headers={"Origin": gateway.origin})


async def next_snapshot(ws: aiohttp.ClientWebSocketResponse, timeout: float = 15) -> dict:
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] == "snapshot":
            return data


def csrf_of(page: str) -> str:
    match = re.search(r'data-csrf="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


@pytest.fixture
async def console(start_gateway, make_user, make_group, tmp_path):
    """A gateway whose admins are one real group, with an audit file and recordings; an admin
    (in the group) and a student (not)."""
    group = make_group()
    admin = make_user(groups=(group,))
    student = make_user()
    audit_log = tmp_path / "audit.jsonl"
    records = tmp_path / "records"
    gateway = await start_gateway(
        auth={"admin_groups": [group]}, audit={"log": str(audit_log), "record_dir": str(records)},
    )
    return gateway, admin, student, group, audit_log, records


async def test_stats_of_a_container_that_is_not_there_is_none(gateway):
    """The contract: None, not an error, for a gone container (the real Docker backend)."""
    assert await gateway.app[BACKEND].stats("0" * 64) is None


def test_cpu_percent_is_the_rate_between_two_readings():
    first = ContainerStats(cpu_seconds=10.0, memory_bytes=1, memory_limit=0, at=100.0)
    assert cpu_percent(None, first) is None
    assert cpu_percent(first, ContainerStats(10.5, 1, 0, 102.0)) == 25.0
    assert cpu_percent(first, ContainerStats(9.0, 1, 0, 102.0)) is None  # a new container under the same id
    assert cpu_percent(first, first) is None


async def test_non_admins_get_403_everywhere_and_401_without_login(console):
    gateway, admin, student, group, audit_log, records = console
    async with aiohttp.ClientSession(base_url=gateway.url) as anonymous:
        for url in CONSOLE_URLS + ["/admin/ws"]:
            async with anonymous.get(url) as resp:
                assert resp.status == 401, url
    http = await gateway.login(student)
    try:
        for url in CONSOLE_URLS:
            async with http.get(url) as resp:
                assert resp.status == 403, url
                assert "admin groups" in await resp.text()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await console_socket(gateway, http)
        assert refused.value.status == 403
        async with http.post("/admin/end", data={"user": admin.name, "csrf": "x"},
                             headers={"Origin": gateway.origin}) as resp:
            assert resp.status == 403
    finally:
        await http.close()
    assert not audit_events(audit_log, "admin_view")


async def test_admin_sees_sessions_with_docker_stats_and_ends_them(console):
    """The student's live session appears on the admin's socket with Docker's CPU and memory
    figures and its bytes; ending it needs the page's CSRF token and a same-origin Origin; the
    student is told `killed`; the audit trail has who and whom."""
    gateway, admin, student, group, audit_log, records = console
    student_http, admin_http = await gateway.login(student), await gateway.login(admin)
    try:
        term = await open_terminal(gateway, student_http)
        session_id = (await term.control("session"))["id"]
        await term.send("yes > /dev/null &\r")  # something for the CPU figure to show

        async with admin_http.get("/admin") as resp:
            assert resp.status == 200
            page = await resp.text()
        csrf = csrf_of(page)
        ws = await console_socket(gateway, admin_http)
        rows: dict = {}

        async def busy() -> bool:
            snapshot = await next_snapshot(ws)
            rows.update({r["id"]: r for r in snapshot["sessions"]})
            row = rows.get(session_id)
            return row is not None and (row["cpu_percent"] or 0) > 5

        await wait_for(busy, timeout=30, what="the student's session with a CPU figure")
        row = rows[session_id]
        assert row["user"] == student.name and row["door"] == "web" and row["profile"] == "default"
        assert 0 < row["memory"] < row["memory_limit"] == 200 * 1024**2
        assert row["bytes_in"] > 0 and row["bytes_out"] > 0 and row["recording"] is True
        assert row["container"].startswith("termbridge-") and row["gateway"] == gateway.app[INSTANCE]

        async with admin_http.post("/admin/end", data={"session": session_id, "csrf": "wrong"},
                                   headers={"Origin": gateway.origin}) as resp:
            assert resp.status == 403
        async with admin_http.post("/admin/end", data={"session": session_id, "csrf": csrf},
                                   headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403
        assert not term.closed
        async with admin_http.post("/admin/end", data={"session": session_id, "csrf": csrf},
                                   headers={"Origin": gateway.origin}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json()) == {"killed": [session_id]}
        ended = await term.control("exit")
        assert ended["reason"] == "killed" and "administrator" in ended["message"]
        await containers_gone(**{"termbridge.session": session_id})

        async def gone() -> bool:
            return session_id not in {r["id"] for r in (await next_snapshot(ws))["sessions"]}

        await wait_for(gone, what="the ended session to leave the console")
        await ws.close()
    finally:
        await student_http.close()
        await admin_http.close()
    [view] = audit_events(audit_log, "admin_view")
    assert view["admin"] == admin.name and view["what"] == "console" and view["door"] == "web"
    [kill] = audit_events(audit_log, "admin_kill")
    assert kill["admin"] == admin.name and kill["user"] == student.name and kill["session"] == session_id
    [session_kill] = audit_events(audit_log, "session_kill")
    assert session_kill["by"] == "admin" and session_kill["session"] == session_id


async def test_removed_from_the_group_mid_session(console):
    """`gpasswd -d`: the open console socket is closed at its next refresh with NOT_ADMIN, and
    every console URL is 403 from then on, with the same login cookie."""
    gateway, admin, student, group, audit_log, records = console
    http = await gateway.login(admin)
    try:
        ws = await console_socket(gateway, http)
        await next_snapshot(ws)
        subprocess.run(["gpasswd", "-d", admin.name, group], check=True, capture_output=True)
        while True:
            msg = await asyncio.wait_for(ws.receive(), 10)
            if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "denied":
                continue
            break
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == NOT_ADMIN, msg
        for url in CONSOLE_URLS:
            async with http.get(url) as resp:
                assert resp.status == 403, url
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await console_socket(gateway, http)
    finally:
        await http.close()


async def test_end_every_session_of_a_user(console):
    gateway, admin, student, group, audit_log, records = console
    student_http, admin_http = await gateway.login(student), await gateway.login(admin)
    try:
        terms = [await open_terminal(gateway, student_http) for _ in range(2)]
        ids = [(await t.control("session"))["id"] for t in terms]
        async with admin_http.get("/admin") as resp:
            csrf = csrf_of(await resp.text())
        async with admin_http.post("/admin/end", data={"user": student.name, "csrf": csrf},
                                   headers={"Origin": gateway.origin}) as resp:
            assert sorted((await resp.json())["killed"]) == sorted(ids)
        for term in terms:
            assert (await term.control("exit"))["reason"] == "killed"
        async with admin_http.post("/admin/end", data={"user": student.name, "csrf": csrf},
                                   headers={"Origin": gateway.origin}) as resp:
            assert resp.status == 404
        for session_id in ids:
            await containers_gone(**{"termbridge.session": session_id})
    finally:
        await student_http.close()
        await admin_http.close()
    assert sorted(e["session"] for e in audit_events(audit_log, "admin_kill")) == sorted(ids)


async def test_recordings_for_admins_only_and_no_path_but_an_id(console):
    gateway, admin, student, group, audit_log, records = console
    student_http, admin_http = await gateway.login(student), await gateway.login(admin)
    try:
        term = await open_terminal(gateway, student_http)
        session_id = (await term.control("session"))["id"]
        await term.send("echo recorded-$((6*7))\r")
        await term.expect(b"recorded-42")
        await asyncio.sleep(1.5)  # recordings are flushed within a second
        async with admin_http.get(f"/admin/recording?session={session_id}") as resp:
            assert resp.status == 200
            cast = await resp.text()
        assert json.loads(cast.splitlines()[0])["version"] == 2 and "recorded-42" in cast
        # the owner may not fetch it (nor anyone else's): recordings are for admins
        async with student_http.get(f"/admin/recording?session={session_id}") as resp:
            assert resp.status == 403
        async with student_http.get(f"/admin/play?session={session_id}") as resp:
            assert resp.status == 403
        (records / "notes.cast").write_text("{}")
        for wrong in ["../audit.jsonl", "..%2Faudit.jsonl", "notes", session_id.upper(), session_id + "/../x", ""]:
            async with admin_http.get(f"/admin/recording?session={wrong}") as resp:
                assert resp.status == 404, wrong
        async with admin_http.get(f"/admin/play?session={session_id}") as resp:
            assert resp.status == 200
            assert "'wasm-unsafe-eval'" in resp.headers["Content-Security-Policy"]
        async with admin_http.get("/admin") as resp:
            assert "'wasm-unsafe-eval'" not in resp.headers["Content-Security-Policy"]
        ws = await console_socket(gateway, admin_http)
        snapshot = await next_snapshot(ws)
        listed = {r["session"]: r for r in snapshot["recordings"]}
        assert listed[session_id]["user"] == student.name and listed[session_id]["door"] == "web"
        assert "notes" not in listed
        assert any(e.get("event") == "admin_view" for e in snapshot["audit"])
        await term.send("exit\r")
        await term.control("exit")
        # ended: still listed, and still played
        async def ended() -> bool:
            snapshot = await next_snapshot(ws)
            assert session_id in {r["session"] for r in snapshot["recordings"]}
            return session_id not in {r["id"] for r in snapshot["sessions"]}

        await wait_for(ended, what="the session to end, its recording still listed")
        async with admin_http.get(f"/admin/recording?session={session_id}") as resp:
            assert resp.status == 200 and "recorded-42" in await resp.text()
        await ws.close()
    finally:
        await student_http.close()
        await admin_http.close()
    assert [e["what"] for e in audit_events(audit_log, "admin_view")] == [
        f"recording {session_id}", "console", f"recording {session_id}"]


async def test_the_console_shows_and_ends_another_gateways_sessions(start_gateway, make_user, make_group, redis_url,
                                                                   tmp_path):
    """Two gateways sharing a Redis store: the console of one lists a session the other serves,
    with Docker's figures for its container, and ends it through the store."""
    group = make_group()
    admin, student = make_user(groups=(group,)), make_user()
    shared = {"store": {"url": redis_url, "secret_file": str(tmp_path / "store-key")}, "auth": {"admin_groups": [group]}}
    here, there = await start_gateway(**shared), await start_gateway(**shared)
    student_http, admin_http = await there.login(student), await here.login(admin)
    try:
        term = await open_terminal(there, student_http)
        session_id = (await term.control("session"))["id"]
        async with admin_http.get("/admin") as resp:
            csrf = csrf_of(await resp.text())
        ws = await console_socket(here, admin_http)
        found: dict = {}

        async def measured() -> bool:
            rows = {r["id"]: r for r in (await next_snapshot(ws))["sessions"]}
            found.update(rows.get(session_id) or {})
            return found.get("cpu_percent") is not None

        await wait_for(measured, timeout=20, what="the other gateway's session, measured")
        assert found["gateway"] == there.app[INSTANCE] != here.app[INSTANCE]
        assert found["user"] == student.name and found["memory"] > 0 and found["bytes_in"] is None
        async with admin_http.post("/admin/end", data={"session": session_id, "csrf": csrf},
                                   headers={"Origin": here.origin}) as resp:
            assert (await resp.json()) == {"killed": [session_id]}
        assert (await term.control("exit"))["reason"] == "killed"
        await ws.close()
    finally:
        await student_http.close()
        await admin_http.close()
    await containers_gone(**{"termbridge.session": session_id})


async def test_the_console_lives_under_the_base_path(start_gateway, make_user, make_group):
    group = make_group()
    admin = make_user(groups=(group,))
    gateway = await start_gateway(web={"base_path": "/tb/"}, auth={"admin_groups": [group]})
    http = aiohttp.ClientSession(base_url=gateway.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.post("/tb/login", data={"username": admin.name, "password": admin.password,
                                                "csrf": await csrf_token(http, "/tb/login")},
                             headers={"Origin": gateway.origin}, allow_redirects=False) as resp:
            assert resp.status == 303
        async with http.get("/admin") as resp:
            assert resp.status == 404
        async with http.get("/tb/admin") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert 'href="/tb/static/termbridge.css"' in page and 'src="/tb/static/console.js"' in page
        ws = await http.ws_connect("/tb/admin/ws", headers={"Origin": gateway.origin})
        assert (await next_snapshot(ws))["sessions"] == []
        await ws.close()
    finally:
        await http.close()


# -- over SSH --------------------------------------------------------------------------------------


async def test_ssh_sessions_lists_for_admins_and_starts_no_container(console, start_gateway, tmp_path):
    """`ssh admin@host sessions` with the real ssh client prints what `termbridge sessions list`
    prints (idle times aside), starts no container for the admin, and is audited; a student gets
    a one-line refusal, and a student's `sessions` never reaches their container."""
    import os
    import sys

    from bridge.app import SSH_DOOR
    from test_ssh_front import SSH_ON, Door

    gateway, admin, student, group, audit_log, records = console
    web = await start_gateway(
        ssh=SSH_ON, auth={"admin_groups": [group]}, audit={"log": str(audit_log), "record_dir": str(records)},
    )
    door = Door(web, web.app[SSH_DOOR].port, tmp_path / "known_hosts")
    student_http = await web.login(student)
    try:
        term = await open_terminal(web, student_http)
        session_id = (await term.control("session"))["id"]
        rc, out, err = await door.run(door.ssh(admin, "sessions"), password=admin.password)
        assert rc == 0, err
        listed = out.decode().splitlines()
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bridge", "sessions", "list", "--config", str(web.config_path)],
            capture_output=True, text=True, timeout=30, env={**os.environ},
        )
        assert cli.returncode == 0, cli.stderr

        def without_idle(lines: list[str]) -> list[list[str]]:
            return [line.split()[:6] + line.split()[7:] for line in lines]

        assert without_idle(listed) == without_idle(cli.stdout.splitlines())
        assert listed[0].split() == ["ID", "USER", "DOOR", "PROFILE", "CONTAINER", "STARTED", "IDLE", "GATEWAY"]
        assert [line.split()[:4] for line in listed[1:]] == [[session_id, student.name, "web", "default"]]
        assert not [s for s in web.app[MANAGER].list() if s.user.name == admin.name]
        assert not session_containers(**{"termbridge.user": admin.name})

        rc, out, err = await door.run(door.ssh(student, "sessions"), password=student.password)
        assert rc == 1 and out == b""
        assert err.strip() == "termbridge: `sessions` lists every session for members of the gateway's admin groups (auth.admin_groups) only"
        await term.send("exit\r")
        await term.control("exit")
    finally:
        await student_http.close()
    [view] = [e for e in audit_events(audit_log, "admin_view") if e["door"] == "ssh"]
    assert view["admin"] == admin.name and view["what"] == "sessions"
    assert not [e for e in audit_events(audit_log, "session_start") if e["user"] == admin.name]
    await containers_gone(**{"termbridge.user": student.name})


# -- in the browser --------------------------------------------------------------------------------

BROWSER = pytest.mark.browser


@BROWSER
@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_console_in_chromium(browser, console, scheme):
    """An admin and a student in two browser contexts: the student's session appears in the
    admin's console live (no reload) with Docker's CPU and memory figures, the filter stays put
    across refreshes, the admin ends it and the student's page shows the ended dialog with reason
    `killed`; the console and the player pass axe in light and dark; the player renders text from
    the recording. Screenshots: test-artifacts/console-<scheme>.png and player-<scheme>.png."""
    from playwright.async_api import expect

    from helpers import ARTIFACTS, axe_check, goto, log_in

    gateway, admin, student, group, audit_log, records = console
    admin_context = await browser.new_context(color_scheme=scheme, viewport={"width": 1280, "height": 800})
    student_context = await browser.new_context(color_scheme=scheme)
    console_page = await admin_context.new_page()
    await log_in(console_page, gateway, admin)
    await goto(console_page, gateway.url + "/admin")
    await expect(console_page.locator("body")).to_have_attribute("data-live", "live", timeout=15_000)
    await expect(console_page.locator("#sessions-empty")).to_be_visible()

    student_page = await student_context.new_page()
    await log_in(student_page, gateway, student)
    student_body = student_page.locator("body")
    await expect(student_body).to_have_attribute("data-state", "running", timeout=30_000)
    session_id = await student_body.get_attribute("data-session")
    await student_page.locator(".xterm-helper-textarea").focus()
    await student_page.keyboard.type("echo played-$((6*7))")
    await student_page.keyboard.press("Enter")

    row = console_page.locator(f'#sessions tr[data-session="{session_id}"]')
    await expect(row.locator('[data-col="user"]')).to_have_text(student.name, timeout=15_000)
    await expect(row.locator('[data-col="cpu"]')).to_have_text(re.compile(r"^\d+\.\d %$"), timeout=15_000)
    await expect(row.locator('[data-col="memory"]')).to_have_text(re.compile(r"^[\d.]+ (KiB|MiB) / 200\.0 MiB$"))
    await expect(row.locator('[data-col="door"]')).to_have_text("web")
    await expect(row.locator("a.action-watch")).to_have_attribute("href", f"/admin/watch/{session_id}")
    await expect(row.locator("a.action-join")).to_have_attribute("href", f"/admin/join/{session_id}")
    await console_page.get_by_label("Filter by user").fill(student.name[:5])
    first_seen = await console_page.locator("#console-live").text_content()
    await expect(console_page.locator("#console-live")).not_to_have_text(first_seen or "", timeout=10_000)
    await expect(console_page.get_by_label("Filter by user")).to_have_value(student.name[:5])
    await expect(row).to_be_visible()
    await expect(console_page.locator("#recordings").get_by_role("link", name=re.compile(session_id[:12]))).to_be_visible()
    await axe_check(console_page, f"console-{scheme}")
    ARTIFACTS.mkdir(exist_ok=True)
    await console_page.screenshot(path=str(ARTIFACTS / f"console-{scheme}.png"), full_page=True)

    # the recording, played in the page while the session is live
    await asyncio.sleep(1.5)  # flushed within a second
    player_page = await admin_context.new_page()
    await goto(player_page, f"{gateway.url}/admin/play?session={session_id}")
    await expect(player_page.locator(".ap-term, .ap-terminal").first).to_contain_text("played-42", timeout=20_000)
    await axe_check(player_page, f"player-{scheme}")
    await player_page.screenshot(path=str(ARTIFACTS / f"player-{scheme}.png"))
    await player_page.close()

    await row.get_by_role("button", name=re.compile("^End ")).click()
    dialog = console_page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    await axe_check(console_page, f"console-confirm-{scheme}")
    await dialog.get_by_role("button", name="End").click()
    await expect(console_page.locator("#action-result")).to_have_text("Ended 1 session.")
    await expect(student_body).to_have_attribute("data-state", "ended", timeout=15_000)
    await expect(student_body).to_have_attribute("data-reason", "killed")
    await expect(student_page.locator("#ended-reason")).to_contain_text("An administrator ended this session")
    await expect(row).to_have_count(0, timeout=10_000)
    await containers_gone(**{"termbridge.session": session_id})

    # removed from the group: the open console stops by itself and says why
    subprocess.run(["gpasswd", "-d", admin.name, group], check=True, capture_output=True)
    await expect(console_page.locator("body")).to_have_attribute("data-live", "denied", timeout=10_000)
    await expect(console_page.get_by_role("alert")).to_contain_text("admin groups")
    await expect(console_page.get_by_label("Filter by user")).to_be_enabled()
    await axe_check(console_page, f"console-denied-{scheme}")
    await admin_context.close()
    await student_context.close()
    assert [e["user"] for e in audit_events(audit_log, "admin_kill")] == [student.name]
