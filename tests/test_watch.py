"""Admins watching and joining someone's session, against the real gateway, PAM accounts, host
groups and containers: the admin check on every page and socket (also mid-watch), the replay of
the current screen, read-only watching, a join's keystrokes reaching the shell and recorded as
the admin's, the owner being told, and the audit trail."""

from __future__ import annotations

import json
import subprocess

import aiohttp
import pytest

from helpers import PROMPT, Terminal, containers_gone, wait_for


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def viewers_now(term: Terminal, expected: list[dict], timeout: float = 15.0) -> None:
    """Wait until the owner's latest `viewers` message lists exactly `expected`."""

    async def latest() -> bool:
        seen = [m for m in term.controls if m.get("type") == "viewers"]
        if seen and seen[-1]["viewers"] == expected:
            return True
        try:
            await term._receive(0.2)
        except TimeoutError:
            pass
        return False

    await wait_for(latest, timeout=timeout, interval=0, what=f"viewers {expected}")


async def refused(http: aiohttp.ClientSession, path: str, origin: str) -> int:
    try:
        ws = await http.ws_connect(path, headers={"Origin": origin})
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


@pytest.fixture
def admin_setup(make_user, make_group, tmp_path):
    group = make_group()
    return group, make_user(groups=(group,)), make_user(), tmp_path / "audit.log", tmp_path / "rec"


async def test_watch_and_join_over_sockets(start_gateway, admin_setup):
    group, admin, student, audit_log, record_dir = admin_setup
    gw = await start_gateway(auth={"admin_groups": [group]}, audit={"log": str(audit_log), "record_dir": str(record_dir)})
    owner_http, admin_http = await gw.login(student), await gw.login(admin)
    try:
        term = await gw.terminal(owner_http, cols=100, rows=30)
        sid = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        await term.send("echo before-$((6*7))\r")
        await term.expect(b"before-42")

        # nobody else gets in: not the owner, not a stranger, not without a login
        for path in (f"/admin/watch/{sid}", f"/admin/join/{sid}"):
            async with owner_http.get(path) as resp:
                assert resp.status == 403
            assert await refused(owner_http, path + "/ws", gw.origin) == 403
            async with aiohttp.ClientSession(base_url=gw.url) as anonymous:
                assert await refused(anonymous, path + "/ws", gw.origin) == 401
        async with admin_http.get(f"/admin/watch/{sid}") as resp:
            assert resp.status == 200 and student.name in await resp.text()
        async with admin_http.get("/admin/watch/" + "0" * 32) as resp:
            assert resp.status == 404
        assert await refused(admin_http, f"/admin/watch/{sid}/ws", "http://evil.example") == 403

        # watch: the current screen first, then live; typing does nothing
        view = Terminal(await admin_http.ws_connect(f"/admin/watch/{sid}/ws", headers={"Origin": gw.origin}))
        hello = await view.control("watch")
        assert (hello["user"], hello["mode"], hello["cols"], hello["rows"]) == (student.name, "watch", 100, 30)
        await view.expect(b"before-42")
        await viewers_now(term, [{"user": admin.name, "mode": "watch"}])
        await term.send("echo live-$((7*7))\r")
        await view.expect(b"live-49")
        await view.send("echo sneaky-$((2*2))\r")
        assert "read-only" in (await view.control("error"))["message"]
        await term.resize(90, 25)
        assert (await view.control("size"))["cols"] == 90
        assert "sneaky-4" not in await term.run("echo still-mine")
        await view.ws.close()
        await viewers_now(term, [])

        # join: the admin's keystrokes run in the owner's shell
        joined = Terminal(await admin_http.ws_connect(f"/admin/join/{sid}/ws", headers={"Origin": gw.origin}))
        await joined.control("watch")
        await viewers_now(term, [{"user": admin.name, "mode": "join"}])
        await joined.send("echo helped-$((5*5))\r")
        await term.expect(b"helped-25")
        await joined.expect(b"helped-25")

        # removed from the admin group mid-join: the view ends within seconds
        subprocess.run(["gpasswd", "-d", admin.name, group], check=True, capture_output=True)
        await joined.drain_until_closed(timeout=10)
        assert joined.close_code == 4003
        await viewers_now(term, [])
        async with admin_http.get(f"/admin/join/{sid}") as resp:
            assert resp.status == 403

        await term.send("exit\r")
        await term.control("exit")
        await containers_gone(**{"termbridge.session": sid})
    finally:
        await owner_http.close()
        await admin_http.close()

    def audit(kind: str) -> list[dict]:
        return [e for e in events(audit_log) if e["event"] == kind and e.get("session") == sid]

    await wait_for(lambda: audit("session_end"), what="session_end")
    for kind in ("watch_start", "watch_end", "join_start", "join_end"):
        [event] = audit(kind)
        assert (event["admin"], event["user"]) == (admin.name, student.name), event
    # the recording: the admin's input as theirs (the owner's is not recorded: record_input is off)
    lines = [json.loads(line) for line in (record_dir / f"{sid}.cast").read_text().splitlines()[1:]]
    typed = "".join(e[2] for e in lines if e[1] == "i")
    assert "echo helped-$((5*5))" in typed and "before" not in typed
    assert all(e[3] == {"by": admin.name} for e in lines if e[1] == "i")
    markers = [e[2] for e in lines if e[1] == "m"]
    assert f"{admin.name} started watching" in markers and f"{admin.name} joined (may type)" in markers


async def test_watch_under_a_base_path(start_gateway, admin_setup):
    """Under `web.base_path` the watch page, its assets (relative URLs) and its socket answer."""
    import re
    from urllib.parse import urljoin

    group, admin, student, _, _ = admin_setup
    gw = await start_gateway(auth={"admin_groups": [group]}, web={"base_path": "/lab/"})
    owner_http, admin_http = await gw.login(student), await gw.login(admin)
    try:
        term = await gw.terminal(owner_http)
        sid = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        page_url = f"/lab/admin/watch/{sid}"
        async with admin_http.get(page_url) as resp:
            assert resp.status == 200
            html = await resp.text()
        links = re.findall(r'(?:src|href)="(\.\./[^"]+)"', html)
        assets = [link for link in links if "static/" in link]
        assert len(assets) == 3 and urljoin(page_url, "../../admin") in {urljoin(page_url, link) for link in links}
        assert urljoin(page_url, "../../admin") == "/lab/admin"  # the console (its own module)
        for asset in assets:
            async with admin_http.get(urljoin(page_url, asset)) as resp:
                assert resp.status == 200, asset
        view = Terminal(await admin_http.ws_connect(page_url + "/ws", headers={"Origin": gw.origin}))
        await view.control("watch")
        await term.send("echo based-$((3*5))\r")
        await view.expect(b"based-15")
        async with admin_http.get(f"/admin/watch/{sid}") as resp:
            assert resp.status == 404  # nothing outside the base path
    finally:
        await owner_http.close()
        await admin_http.close()
