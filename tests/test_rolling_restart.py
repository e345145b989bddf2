"""A rolling restart of three gateway replicas behind the real nginx (round-robin, no stickiness),
sharing a real Redis store, while 20 web sessions type: every session comes back (the same
session, through whichever replica nginx picks), nothing typed or printed is lost or doubled,
and no container is left over."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import statistics
import time

import aiohttp

from helpers import PROMPT, Terminal, containers_gone, session_containers
from test_deploy import CLIENT_ADDRESS, nginx_in_front  # noqa: F401 (a fixture)
from test_fleet import start_fleet
from test_lifecycle import run_cli

SESSIONS = 20
ECHO = re.compile(rb"\rt(\d+)\r\n")  # the command's output (its echo reads "echo tN")


class Typist:
    """One page: types `echo tN` every half second and waits for the echo; when its socket
    closes (a replica restarting) it comes back through nginx with its session id and offset."""

    def __init__(self, origin: str, http: aiohttp.ClientSession) -> None:
        self.origin, self.http = origin, http
        self.session_id: str | None = None
        self.output = bytearray()  # every output byte, in offset order
        self.typed = 0
        self.outages: list[float] = []  # seconds from a close to the next `session` message
        self.ids: set[str] = set()

    async def _connect(self) -> Terminal:
        query = f"?session={self.session_id}&offset={len(self.output)}" if self.session_id else ""
        ws = await self.http.ws_connect(f"/ws{query}", headers={"Origin": self.origin}, max_msg_size=0)
        term = Terminal(ws)
        await term.resize(80, 24)
        session = await term.control("session", timeout=30)
        assert session["offset"] == len(self.output), (session, len(self.output))
        assert not [c for c in term.controls if c.get("type") in ("gap", "exit")], term.controls
        self.session_id = session["id"]
        self.ids.add(session["id"])
        return term

    async def _reconnect(self) -> Terminal:
        dropped = time.monotonic()
        while True:
            try:
                term = await self._connect()
            except (aiohttp.ClientError, AssertionError, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.2)
                continue
            self.outages.append(time.monotonic() - dropped)
            return term

    def _take(self, term: Terminal) -> None:
        self.output.extend(term.transcript)
        term.transcript.clear()

    async def run(self, stop: asyncio.Event) -> None:
        term = await self._connect()
        await term.expect(PROMPT, timeout=60)
        self._take(term)
        dropped = False
        while not stop.is_set():
            try:
                if dropped:
                    await self._typed_again(term)
                    dropped = False
                    continue
                self.typed += 1
                await term.send(f"echo t{self.typed}\r")
                await term.expect(f"\rt{self.typed}\r\n".encode(), timeout=20)
                self._take(term)
                await asyncio.sleep(0.5)
            except (AssertionError, ConnectionError, aiohttp.ClientError) as exc:
                if isinstance(exc, AssertionError) and not term.closed:
                    raise AssertionError(f"session {self.session_id}: {exc}") from exc
                await term.ws.close()
                self._take(term)
                term, dropped = await self._reconnect(), True
        await term.send("exit\r")
        await term.control("exit", timeout=30)

    async def _typed_again(self, term: Terminal) -> None:
        """The line typed as the socket closed: its echo came before the drop or comes with the
        replay, unless the keystrokes never reached the shell (a page drops input in flight
        too): then it is typed again."""
        echo = f"\rt{self.typed}\r\n".encode()
        if echo not in bytes(self.output):
            try:
                await term.expect(echo, timeout=5)
            except AssertionError:
                if term.closed or echo in bytes(self.output) + bytes(term.transcript):
                    raise
                await term.send(f"echo t{self.typed}\r")
                await term.expect(echo, timeout=20)
        self._take(term)

    def echoes(self) -> list[int]:
        return [int(n) for n in ECHO.findall(bytes(self.output))]


async def type_through_a_rolling_restart(replicas, typists: list[Typist], running, stop: asyncio.Event) -> list[int]:
    """Each replica in turn: stopped (SIGTERM), started again, 3 s before the next; what each
    typist had typed when the last replica was back."""
    while min(t.typed for t in typists) < 2:  # every session started and typed
        await asyncio.sleep(0.2)
        for task in running:
            if task.done():
                task.result()
    for replica in replicas:
        stopping = time.monotonic()
        replica.signal(signal.SIGTERM)
        assert await replica.wait(15) == 0
        print(f"replica stopped in {time.monotonic() - stopping:.1f} s")
        await replica.start()
        await asyncio.sleep(3)
    typed_after = [t.typed for t in typists]
    await asyncio.sleep(3)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*running), 120)
    return typed_after


async def test_rolling_restart_of_three_replicas_behind_nginx(
    gateway_process, redis_url, nginx_in_front, user, tmp_path  # noqa: F811
):
    replicas = await start_fleet(
        gateway_process, redis_url, tmp_path, max_per_user=SESSIONS, on_shutdown="keep", reconnect_grace="120s"
    )
    front = await nginx_in_front(*(r.gateway.url for r in replicas))
    tls = ssl.create_default_context(cafile=str(front.cert))
    connector = aiohttp.TCPConnector(ssl=tls, local_addr=(CLIENT_ADDRESS, 0), limit=0)
    proxied = replicas[0].gateway.__class__(front.https, None, None)  # type: ignore[arg-type]
    async with await proxied.login(user, connector=connector) as http:
        typists = [Typist(front.https, http) for _ in range(SESSIONS)]
        stop = asyncio.Event()
        running = [asyncio.create_task(t.run(stop)) for t in typists]
        try:
            typed_after = await type_through_a_rolling_restart(replicas, typists, running, stop)
        finally:
            for task in running:
                task.cancel()
            await run_cli("sessions", "kill", "--all", "--config", str(replicas[0].config_path))

    outages = [o for t in typists for o in t.outages]
    print(f"rolling restart, {SESSIONS} sessions: {len(outages)} reconnects, median "
          f"{statistics.median(outages):.2f} s, worst {max(outages):.2f} s (from the close to the session message)")
    for typist, before in zip(typists, typed_after):
        assert len(typist.ids) == 1, typist.ids  # the same session throughout
        assert typist.typed > before  # it typed after the last restart too
        assert typist.echoes() == list(range(1, typist.typed + 1))  # each echo once, in order
    assert max(outages) < 10
    for typist in typists:
        await containers_gone(**{"termbridge.session": typist.session_id})
    assert not session_containers(**{"termbridge.user": user.name})
