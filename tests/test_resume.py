"""Sessions that survive a blip: lossless reattach, ownership, grace, takeover, deaths underneath."""

from __future__ import annotations

import asyncio
import re

import aiohttp


from helpers import PROMPT, containers_gone, session_containers

SEQ_MAX = 300_000


def numbers(transcript: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"(?:^|\r)(\d+)\r$", transcript, re.M)]


async def test_cut_while_printing_then_reattach_is_lossless(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await term.send(f"seq 1 {SEQ_MAX}; echo SEQ-DONE\r")
        while term.received < 200_000:  # well into the output, far from its end (~2 MB)
            await term._receive(30)
        term.cut()
        before, offset = bytes(term.transcript), term.received

        again = await gateway.terminal(http, path=f"/ws?session={session['id']}&offset={offset}")
        resumed = await again.control("session")
        assert resumed["id"] == session["id"]
        assert resumed["offset"] == offset
        await again.expect(re.compile(rb"\r\nSEQ-DONE\r\n"), timeout=120)
        # A gap would come right after `session`, ahead of the output: by now it would be here.
        assert [m["type"] for m in again.controls] == ["session"], again.controls
        assert numbers(before + bytes(again.transcript)) == list(range(1, SEQ_MAX + 1))
        await again.send("exit\r")
        assert (await again.control("exit"))["reason"] == "exit"
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_reattach_from_an_offset_older_than_the_buffer_reports_the_gap(gateway, user):
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await term.send("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo BIG-DONE\r")
        await term.expect(re.compile(rb"\r\nBIG-DONE\r\n"), timeout=120)
        await term.expect(PROMPT)
        total = term.received
        await term.ws.close()

        again = await gateway.terminal(http, path=f"/ws?session={session['id']}&offset=0")
        resumed = await again.control("session")
        gap = await again.control("gap")
        assert resumed["id"] == session["id"]
        assert gap["lost"] == resumed["offset"] > 0
        while again.received < total - resumed["offset"]:
            await again._receive(30)
        assert bytes(again.transcript) == bytes(term.transcript)[resumed["offset"]:]
        assert 1024 * 1024 <= len(again.transcript) <= 1024 * 1024 + 65536
        await again.send("exit\r")
        await again.control("exit")


async def test_another_users_session_id_never_attaches(gateway, make_user):
    alice, mallory = make_user(), make_user()
    async with await gateway.login(alice) as http_a, await gateway.login(mallory) as http_m:
        term_a = await gateway.terminal(http_a)
        session_a = await term_a.control("session")
        await term_a.expect(PROMPT)
        await term_a.ws.close()  # alice's session is detached: the best moment to steal it

        term_m = await gateway.terminal(http_m, path=f"/ws?session={session_a['id']}&offset=0")
        session_m = await term_m.control("session")
        assert session_m["id"] != session_a["id"]
        await term_m.expect(PROMPT)
        assert (await term_m.run("whoami")).strip() == mallory.name
        assert alice.name.encode() not in bytes(term_m.transcript)
        await term_m.send("exit\r")
        await term_m.control("exit")

        back = await gateway.terminal(http_a, path=f"/ws?session={session_a['id']}&offset=0")
        assert (await back.control("session"))["id"] == session_a["id"]
        await back.send("exit\r")
        await back.control("exit")


async def test_grace_expiry_frees_the_container(start_gateway, user):
    gateway = await start_gateway(session={"reconnect_grace": "2s"})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        term.cut()
        await asyncio.sleep(0.5)
        assert session_containers(**{"termbridge.session": session["id"]}), "removed before the grace ended"
        await containers_gone(**{"termbridge.session": session["id"]})
        late = await gateway.terminal(http, path=f"/ws?session={session['id']}&offset=0")
        fresh = await late.control("session")
        assert fresh["id"] != session["id"]
        await late.send("exit\r")
        await late.control("exit")


async def test_a_second_window_takes_the_session_over(gateway, user):
    async with await gateway.login(user) as http:
        first = await gateway.terminal(http)
        session = await first.control("session")
        await first.expect(PROMPT)
        await first.send("export TB_MARK=still-mine\r")
        await first.expect(PROMPT)
        second = await gateway.terminal(http, path=f"/ws?session={session['id']}&offset={first.received}")
        assert (await second.control("session"))["id"] == session["id"]
        assert "another window" in (await first.control("error"))["message"]
        await first.drain_until_closed()
        assert first.close_code == 4001
        assert (await second.run("echo $TB_MARK")).strip() == "still-mine"
        await second.send("exit\r")
        await second.control("exit")


async def test_killed_container_ends_the_session_with_error(gateway, user, docker_engine):
    async with await gateway.login(user) as http:
        for how in ("kill", "remove"):
            term = await gateway.terminal(http)
            session = await term.control("session")
            await term.expect(PROMPT)
            [container] = session_containers(**{"termbridge.session": session["id"]})
            if how == "kill":
                await asyncio.to_thread(container.kill)
            else:
                await asyncio.to_thread(container.remove, force=True)
            exit_msg = await term.control("exit", timeout=20)
            assert exit_msg["reason"] == "error" and exit_msg["code"] is None
            assert re.search(r"container (stopped \(exit code 137\)|was removed)", exit_msg["message"]), exit_msg
            await containers_gone(**{"termbridge.session": session["id"]})



async def test_resume_requires_login(gateway):
    async with aiohttp.ClientSession(base_url=gateway.url) as anon:
        resp = await anon.get("/ws?session=x&offset=0", headers={"Origin": gateway.origin})
        assert resp.status == 401
