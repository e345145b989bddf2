"""The session holder (session-image/holder/tb-holder.c) in a real session container: real sshd,
real asyncssh connections, `tb-holder attach` over an SSH channel with a pty."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import asyncssh
import pytest

from bridge.backends.base import Container, ContainerSpec
from bridge.config import SessionConfig
from bridge.backends.docker import DockerBackend
from bridge.errors import SessionStartError
from bridge.pool import wait_for_sshd
from bridge.upstream import HOLDER_HEADER, HeldShell, SessionKeys, Upstream
from helpers import PROMPT, TEST_IMAGE

HOST_UID = 4242  # alice's uid on the host: her session uid is session.uid_base + this
SESSION_UID = SessionConfig().uid_base + HOST_UID


@dataclass
class Attachment:
    """One `tb-holder attach` over its own SSH connection, with the header parsed."""

    upstream: Upstream
    held: HeldShell | None  # None: attached on a pty, as a person would
    process: asyncssh.SSHClientProcess | None
    offset: int  # absolute offset of the first byte after the header
    lost: int
    shell: str
    data: bytes = b""  # output after the header
    seen: int = 0  # where the next expect starts looking

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    async def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 15.0) -> re.Match[bytes]:
        """The next match after the previous one."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        async with asyncio.timeout(timeout):
            while not (match := regex.search(self.data, self.seen)):
                await self.more()
        self.seen = match.end()
        return match

    async def more(self) -> None:
        if self.held:
            chunk = await self.held.read(65536)
        else:
            assert self.process
            chunk = await self.process.stdout.read(65536)
        if not chunk:
            raise ConnectionError(f"closed; last output {self.data[-300:]!r}")
        self.data += chunk

    def send(self, text: str) -> None:
        if self.held:
            self.held.write(text.encode())
        else:
            assert self.process
            self.process.stdin.write(text.encode())

    async def exit(self, timeout: float = 15) -> tuple[int | None, str | None]:
        """(exit status, signal name) of `tb-holder attach`."""
        async with asyncio.timeout(timeout):
            if self.held:
                return await self.held.wait_exit()
            assert self.process
            result = await self.process.wait()
            return result.exit_status, result.exit_signal[0] if result.exit_signal else None

    async def drop(self) -> None:
        """The gateway goes away: the SSH connection is cut, nothing is said to the holder."""
        self.upstream.close()
        await self.upstream.wait_closed()


@dataclass
class Session:
    backend: DockerBackend
    container: Container
    keys: SessionKeys

    async def attach(
        self, offset: int = 0, cols: int = 80, rows: int = 24, repaint: bool = False, term: str = "xterm-256color",
        env: dict[str, str] | None = None,
    ) -> Attachment:
        upstream = await Upstream.connect(self.container, self.keys, 30)
        held = await upstream.attach_held(term, cols, rows, offset, env=env, repaint=repaint)
        return Attachment(upstream, held, None, held.offset, held.lost, "new" if held.new_shell else "running")

    async def attach_on_pty(self, cols: int, rows: int) -> Attachment:
        """`tb-holder attach` on a terminal, as `ssh -t` would run it."""
        upstream = await Upstream.connect(self.container, self.keys, 30)
        process = await upstream.conn.create_process(
            "tb-holder attach --offset 999999999", term_type="xterm-256color", term_size=(cols, rows), encoding=None
        )
        att = Attachment(upstream, None, process, 0, 0, "")
        match = await att.expect(HOLDER_HEADER)
        att.offset, att.lost, att.shell, att.data = int(match[1]), int(match[2]), match[3].decode(), b""
        att.seen = 0
        return att

    async def state(self) -> tuple[bool, int | None]:
        state = await self.backend.poll(self.container.id)
        return state.running and not state.gone, state.exit_code

    async def wait_stopped(self, timeout: float) -> float:
        """Seconds until the container stopped by itself."""
        t0 = time.monotonic()
        while (await self.state())[0]:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"container still running after {timeout}s")
            await asyncio.sleep(0.2)
        return time.monotonic() - t0


StartSession = Callable[..., Awaitable[Session]]


@pytest.fixture
async def start_session() -> AsyncIterator[StartSession]:
    backends: list[tuple[DockerBackend, str]] = []

    async def start(idle: float = 600, lifetime: float = 3600, root: bool = False, pooled: bool = False) -> Session:
        cfg = replace(SessionConfig(), image=TEST_IMAGE, idle_timeout=idle, max_lifetime=lifetime)
        backend = DockerBackend(cfg, f"test-holder-{os.getpid()}")
        keys = SessionKeys.generate()
        spec = ContainerSpec(
            session_id=os.urandom(16).hex(), user="" if root or pooled else "alice", door="pool" if pooled else "web",
            started=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            authorized_keys=keys.authorized_keys, host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key, root=root, uid=None if root or pooled else HOST_UID,
        )
        container = await backend.start(spec)
        backends.append((backend, container.id))
        return Session(backend, container, keys)

    yield start
    for backend, cid in backends:
        await backend.stop(cid)
        await backend.close()


async def counter(att: Attachment, at_least: int) -> int:
    """The counter loop's latest number, once it reached `at_least`."""
    while True:
        numbers = [int(n) for n in re.findall(rb"(?<=[\r\n])(\d+)\r\n", att.data)]
        if numbers and numbers[-1] >= at_least:
            return numbers[-1]
        async with asyncio.timeout(15):
            await att.more()


async def test_the_shell_outlives_the_connection_and_the_replay_is_exact(start_session: StartSession) -> None:
    """Drop the SSH connection in the middle of a counter loop; a new connection attached at the
    old offset gets exactly the bytes that followed (no duplicate, no hole) and the loop went on."""
    session = await start_session()
    first = await session.attach()
    assert (first.offset, first.lost, first.shell) == (0, 0, "new")
    await first.expect(PROMPT)
    first.send("i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done\r")
    last = await counter(first, 3)
    offset = first.end
    await first.drop()
    await asyncio.sleep(2)

    second = await session.attach(offset=offset)
    assert (second.offset, second.lost, second.shell) == (offset, 0, "running")
    now = await counter(second, last + 12)
    stream = first.data + second.data
    numbers = [int(n) for n in re.findall(rb"(?<=[\r\n])(\d+)\r\n", stream)]
    assert numbers == list(range(1, now + 1)), "the counter restarted, repeated or skipped"
    assert (await session.state())[0]
    second.send("\x03exit 0\r")
    assert (await second.exit())[0] == 0


async def test_an_offset_older_than_the_ring_reports_the_lost_bytes(start_session: StartSession) -> None:
    """More than 1 MiB of output: attaching from 0 says how much is gone and replays the rest."""
    session = await start_session()
    att = await session.attach()
    await att.expect(PROMPT)
    att.send("head -c 1500000 /dev/zero | tr '\\0' x; echo; echo DONE$((40+2))\r")
    await att.expect(b"DONE42", timeout=60)
    await att.expect(PROMPT)
    total = att.end
    late = await session.attach(offset=0)
    assert late.lost == total - 2**20 == late.offset
    assert late.lost > 0
    await late.expect(b"DONE42")
    for a in (att, late):
        await a.drop()


async def test_two_attachments_see_the_same_output_and_both_type(start_session: StartSession) -> None:
    session = await start_session()
    one = await session.attach()
    await one.expect(PROMPT)
    two = await session.attach(offset=one.end)
    one.send("echo from-$((1+0))-one\r")
    await one.expect(b"from-1-one")
    await two.expect(b"from-1-one")
    two.send("echo from-$((1+1))-two\r")
    await one.expect(b"from-2-two")
    await two.expect(b"from-2-two")
    two.send("exit 3\r")
    assert (await one.exit())[0] == 3
    assert (await two.exit())[0] == 3


async def test_a_stuck_attachment_is_dropped_and_does_not_stop_the_others(start_session: StartSession) -> None:
    """One attachment reads, one never does: the reader gets all 6 MB; the stuck one is let go
    (killed by SIGUSR1, the sign to attach again from its offset)."""
    session = await start_session()
    reader = await session.attach()
    await reader.expect(PROMPT)
    stuck = await session.attach(offset=reader.end)
    reader.send("head -c 6000000 /dev/zero | tr '\\0' y; echo; echo END$((5+5))\r")
    await reader.expect(b"END10", timeout=90)
    assert reader.data.count(b"y") >= 6_000_000
    assert stuck.held
    async with asyncio.timeout(20):  # what it still has in flight, then the end
        while await stuck.held.read(65536):
            pass
    status, signal = await stuck.exit()
    assert signal == "USR1", status
    await reader.drop()


async def test_window_changes_reach_the_shell(start_session: StartSession) -> None:
    """The attach size, a resize frame, the last attacher's size, and a person's `ssh -t` attach
    (raw terminal, window-change on the SSH channel)."""
    session = await start_session()
    att = await session.attach(cols=100, rows=30)
    await att.expect(PROMPT)
    att.send("stty size\r")
    await att.expect(b"30 100")
    assert att.held
    att.held.resize(120, 40)
    att.send("stty size\r")
    await att.expect(b"40 120")
    other = await session.attach(offset=att.end, cols=90, rows=20)
    other.send("stty size\r")
    await other.expect(b"20 90")
    person = await session.attach_on_pty(cols=70, rows=15)
    person.send("stty size; echo $((6*7))\r")
    await person.expect(b"15 70\r\n42\r\n")  # no CR doubled: the person's terminal is raw
    assert person.process
    person.process.change_terminal_size(75, 18)
    await asyncio.sleep(0.3)
    person.send("stty size\r")
    await person.expect(b"18 75")
    person.send("exit 5\r")
    assert (await person.exit())[0] == 5
    for a in (att, other):
        assert (await a.exit())[0] == 5


async def test_exit_status_reaches_the_client_and_the_container_stops(start_session: StartSession) -> None:
    session = await start_session()
    att = await session.attach()
    await att.expect(PROMPT)
    att.send("exit 7\r")
    assert (await att.exit())[0] == 7
    await session.wait_stopped(10)
    assert (await session.state()) == (False, 7)


async def test_idle_with_nobody_attached_ends_the_container(start_session: StartSession) -> None:
    session = await start_session(idle=3)
    att = await session.attach()
    await att.expect(PROMPT)
    att.send("sleep 1000\r")
    await asyncio.sleep(4)
    assert (await session.state())[0], "ended while attached"
    t0 = time.monotonic()
    await att.drop()
    await session.wait_stopped(10)
    assert 2.5 < time.monotonic() - t0 < 6.5


async def test_max_lifetime_ends_the_container_even_when_attached(start_session: StartSession) -> None:
    session = await start_session(lifetime=4)
    att = await session.attach()
    await att.expect(PROMPT)
    att.send("sleep 1000\r")
    assert await att.exit() == (None, "HUP")  # the shell got SIGHUP and died of it
    await session.wait_stopped(10)


async def test_only_the_session_user_and_root_may_attach(start_session: StartSession) -> None:
    session = await start_session()
    att = await session.attach()
    await att.expect(PROMPT)
    att.send("stat -c '%a %U %G' /run/termbridge/holder /run/termbridge/holder/holder.sock\r")
    await att.expect(b"750 root alice\r\n660 root alice")
    # another uid in the session's group passes the file modes; SO_PEERCRED refuses it
    cmd = ["setpriv", f"--reuid={SESSION_UID + 1}", f"--regid={SESSION_UID}", "--clear-groups", "tb-holder", "attach"]
    code, out = await session.backend._call(_exec, session, cmd)
    assert code == 4 and b"not your session" in out, out
    await att.drop()


async def test_a_full_screen_program_is_repainted_on_attach(start_session: StartSession) -> None:
    """`--repaint` (and any gap) sends the foreground program a SIGWINCH: it redraws."""
    session = await start_session()
    att = await session.attach()
    await att.expect(PROMPT)
    # the foreground job, as vim or top would be: it redraws (here: prints) on SIGWINCH
    att.send("sh -c 'trap \"echo REPAINT-\\$((3*3))\" WINCH; while :; do sleep 0.1; done'\r")
    await asyncio.sleep(0.5)
    offset = att.end
    await att.drop()
    again = await session.attach(offset=offset, repaint=True)
    await again.expect(b"REPAINT-9")
    await again.drop()


async def test_a_pooled_container_gets_its_shell_after_the_claim(start_session: StartSession) -> None:
    """Warm pool: sshd already runs when the account comes (over the stdin the backend kept open,
    no `docker exec`, no sshd reload); the holder refuses to start a shell before, and starts it
    as the claimed user after."""
    session = await start_session(pooled=True)
    await wait_for_sshd(session.container, 30)
    refused = await session.backend._call(_exec, session, ["tb-holder", "attach"])
    assert refused[0] == 4 and b"no account" in refused[1], refused
    session.container = await session.backend.claim(session.container, "bob", HOST_UID + 1, False)
    att = await session.attach()
    assert att.shell == "new"
    await att.expect(PROMPT)
    att.send("echo $(id -un):$(id -u):$HOME:$(tty); stat -c %U /proc/self/fd/0\r")
    await att.expect(re.compile(rb"bob:%d:/home/bob:/dev/pts/\d+\r\nbob\r\n" % (SESSION_UID + 1)))
    await att.drop()
    with pytest.raises(SessionStartError, match="no claim channel"):  # one account, once
        await session.backend.claim(session.container, "eve", HOST_UID + 2, False)


async def test_a_pooled_sshd_lets_in_the_claimed_account_alone(start_session: StartSession) -> None:
    """Before the claim nobody gets in with the session's key, not even an account the image has;
    after it, the claimed account and no other."""
    session = await start_session(pooled=True)
    await wait_for_sshd(session.container, 30)

    async def refused(name: str) -> bool:
        try:
            conn = await Upstream.connect(replace(session.container, ssh_user=name), session.keys, 10)
        except SessionStartError as exc:
            return "ermission denied" in exc.detail
        conn.close()
        return False

    assert await refused("bob") and await refused("daemon") and await refused("root")
    session.container = await session.backend.claim(session.container, "bob", HOST_UID + 1, False)
    assert await refused("daemon") and await refused("root")
    (await Upstream.connect(session.container, session.keys, 10)).close()


async def test_a_claim_the_container_refuses_is_an_error_with_its_reason(start_session: StartSession) -> None:
    """The image checks the claim itself (here: a uid below the session range)."""
    session = await start_session(pooled=True)
    channel = session.backend._claims.pop(session.container.id)
    try:
        answer = await channel.claim("bob", 5)
    finally:
        channel.close()
    assert answer == "failed: termbridge: uid 5 is out of range", answer


async def test_an_unclaimed_pooled_container_ends_at_max_lifetime(start_session: StartSession) -> None:
    session = await start_session(pooled=True, lifetime=3)
    assert 1.5 < await session.wait_stopped(10) < 6


async def test_root_mode_gets_a_root_shell(start_session: StartSession) -> None:
    """Also: the first attacher's TERM and locale reach the new shell, nothing else of theirs."""
    session = await start_session(root=True)
    att = await session.attach(term="vt220", env={"LC_TIME": "C.UTF-8", "EVIL": "1"})
    await att.expect(PROMPT)
    att.send("echo uid=$(id -u) home=$HOME term=$TERM lc=$LC_TIME evil=${EVIL:-unset}\r")
    await att.expect(b"uid=0 home=/root term=vt220 lc=C.UTF-8 evil=unset")
    att.send("exit\r")
    assert (await att.exit())[0] == 0


def _exec(session: Session, cmd: list[str], uid: str = "0") -> tuple[int, bytes]:
    api = session.backend._api()
    run = api.exec_create(session.container.id, cmd, user=uid)
    out = api.exec_start(run["Id"])
    return api.exec_inspect(run["Id"])["ExitCode"], out
