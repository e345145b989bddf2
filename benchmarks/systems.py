"""The systems under measurement, each able to open a terminal session (timing connect→prompt)
and to end it (timing close→container gone), all with the same image and limits:

- termbridge's web door and SSH door (a gateway process started by the benchmark);
- floor (a): the docker SDK alone, create + attach + start a container running bash;
- floor (b): our design without the gateway: a container from `DockerBackend` with per-session
  keys, and asyncssh straight into its sshd (`Upstream`);
- ttyd running `docker run -it --rm`.

"Close" is typing `exit` at the prompt, as a person would; "gone" is Docker's destroy event of
the session's container, on the daemon's clock.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import docker

from bridge.backends.base import ContainerSpec
from bridge.config import SessionConfig
from bridge.backends.docker import NETWORK_NAMES, DockerBackend
from bridge.upstream import SessionKeys, Upstream

from .clients import AttachTerm, HeldTerm, OpenSshTerm, Reader, SshTerm, Term, TtydTerm, WebTerm
from .harness import BENCH_LABEL, PROMPT, DestroyWatch, GatewayProcess, HostUser, find_container

KIND_LABEL = "termbridge.bench.kind"


@dataclass
class Opened:
    term: Term
    reader: Reader
    connect_seconds: float
    container_id: str
    extra: Any = None


def docker_limits(cfg: SessionConfig) -> dict[str, Any]:
    """The session limits as docker SDK host-config arguments (the floors use these)."""
    return {
        "nano_cpus": int(cfg.cpus * 1e9),
        "mem_limit": cfg.memory,
        "memswap_limit": cfg.memory,
        "pids_limit": cfg.pids,
        "network_mode": NETWORK_NAMES[cfg.network],
        "init": True,
    }


def docker_run_command(cfg: SessionConfig, labels: dict[str, str]) -> list[str]:
    """The same limits as `docker run -it --rm` flags (what ttyd runs)."""
    limits = docker_limits(cfg)
    cmd = [
        "docker", "run", "-it", "--rm",
        f"--cpus={cfg.cpus}", f"--memory={limits['mem_limit']}", f"--memory-swap={limits['memswap_limit']}",
        f"--pids-limit={limits['pids_limit']}", f"--network={limits['network_mode']}", "--init",
    ]
    cmd += [f"--label={k}={v}" for k, v in labels.items()]
    return cmd + ["--entrypoint", "bash", cfg.image, "-l"]


class System:
    key = ""
    title = ""

    async def open(self) -> Opened:
        raise NotImplementedError

    async def _after_exit(self, opened: Opened) -> None:
        """What the client does once the shell said goodbye (default: nothing more)."""

    async def close(self, opened: Opened) -> float:
        """Type `exit`; seconds until Docker destroyed the container."""
        watch = DestroyWatch(opened.container_id)
        t0 = time.time()
        await opened.term.send(b"exit\r")
        await self._after_exit(opened)
        gone = await watch.at()
        await opened.term.close()
        return gone - t0

    async def setup(self) -> None: ...

    async def teardown(self) -> None: ...


async def _prompt(term: Term, t0: float) -> tuple[Reader, float]:
    reader = Reader(term)
    await reader.until(PROMPT, timeout=60)
    return reader, time.perf_counter() - t0


class WebDoor(System):
    key, title = "web", "termbridge web door"

    def __init__(self, gateway: GatewayProcess, http: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.http = http

    async def open(self) -> Opened:
        t0 = time.perf_counter()
        term = await WebTerm.connect(self.http, self.gateway.url)
        reader, seconds = await _prompt(term, t0)
        session = term.control("session")
        assert session is not None, "prompt before the session message"
        cid = await self.gateway.container_of(session_id=session["id"])
        return Opened(term, reader, seconds, cid)


class SshDoor(System):
    key, title = "ssh", "termbridge SSH door"

    def __init__(self, gateway: GatewayProcess, user: HostUser) -> None:
        self.gateway = gateway
        self.user = user
        self.key_pair = asyncssh.generate_private_key("ssh-ed25519")

    async def setup(self) -> None:
        """The person's own key in ~/.ssh/authorized_keys, as an ssh user would have it."""
        account = pwd.getpwnam(self.user.name)
        ssh_dir = Path(account.pw_dir) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        mine = self.key_pair.export_public_key("openssh")
        known = keys.read_bytes() if keys.exists() else b""
        if mine not in known:  # another system measured alongside may have its key here too
            keys.write_bytes(known + mine)
        for path in (ssh_dir, keys):
            os.chown(path, account.pw_uid, account.pw_gid)
        keys.chmod(0o600)

    async def open(self) -> Opened:
        assert self.gateway.ssh_port is not None
        before = await self.gateway.session_ids()
        t0 = time.perf_counter()
        term = await self._terminal()
        reader, seconds = await _prompt(term, t0)
        cid = await self.gateway.container_of(door="ssh", exclude=before)
        return Opened(term, reader, seconds, cid)

    async def _terminal(self) -> Term:
        assert self.gateway.ssh_port is not None
        conn = await asyncssh.connect(
            "127.0.0.1", self.gateway.ssh_port, username=self.user.name, password=self.user.password,
            client_keys=[self.key_pair], known_hosts=None, agent_path=None, config=[],
        )
        return await SshTerm.open(conn)

    async def _after_exit(self, opened: Opened) -> None:
        await opened.reader.until_closed()
        await opened.term.close()


class SshDoorOpenSsh(SshDoor):
    """The SSH door with OpenSSH's `ssh` as the client instead of asyncssh: the same gateway and
    account, the person's key from a file."""

    key, title = "ssh_openssh", "SSH door, OpenSSH client"

    async def setup(self) -> None:
        await super().setup()
        self.key_file = self.gateway.workdir / "openssh-client-key"
        self.key_file.write_bytes(self.key_pair.export_private_key("openssh"))
        self.key_file.chmod(0o600)

    async def _terminal(self) -> Term:
        assert self.gateway.ssh_port is not None
        return await OpenSshTerm.open(self.gateway.ssh_port, self.user.name, str(self.key_file))


class FloorSsh(System):
    """Our design without the gateway: DockerBackend + per-session keys + asyncssh into sshd."""

    key, title = "floor_ssh", "floor: asyncssh→sshd"

    def __init__(self, cfg: SessionConfig, run: str, user: str, uid: int | None = None) -> None:
        """`uid`: the login's host uid (its session uid derives from it); default: `user`'s account's."""
        self.backend = DockerBackend(cfg, f"bench-{run}")
        self.user = user
        self.uid = pwd.getpwnam(user).pw_uid if uid is None else uid

    async def open(self) -> Opened:
        t0 = time.perf_counter()
        keys = SessionKeys.generate()
        session_id = os.urandom(16).hex()
        spec = ContainerSpec(
            session_id=session_id, user=self.user, door="bench",
            started=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            authorized_keys=keys.authorized_keys, host_private_key=keys.host_private_key,
            host_public_key=keys.host_public_key, uid=self.uid,
        )
        container = await self.backend.start(spec)
        try:
            upstream = await Upstream.connect(container, keys, 30)
            term = await self._terminal(upstream)
        except BaseException:
            await self.backend.stop(container.id)
            raise
        reader, seconds = await _prompt(term, t0)
        return Opened(term, reader, seconds, container.id)

    async def _terminal(self, upstream: Upstream) -> SshTerm:
        """The login shell straight on sshd's pty."""
        return await SshTerm.open(upstream.conn)

    async def _after_exit(self, opened: Opened) -> None:
        await opened.reader.until_closed()
        await opened.term.close()
        await self.backend.stop(opened.container_id)

    async def teardown(self) -> None:
        await self.backend.close()


class HolderSsh(FloorSsh):
    """floor (b) with the session holder between sshd and the shell (`tb-holder attach`)."""

    key, title = "holder_ssh", "floor + holder: asyncssh→sshd→tb-holder"

    async def _terminal(self, upstream: Upstream) -> SshTerm:
        return HeldTerm(upstream.conn, await upstream.attach_held("xterm-256color", 80, 24))


class FloorAttach(System):
    """The docker SDK alone: create (tty, stdin), attach, start, bash; `--rm` semantics."""

    key, title = "floor_attach", "floor: docker attach"

    def __init__(self, cfg: SessionConfig, run: str) -> None:
        self.cfg = cfg
        self.labels = {BENCH_LABEL: run, KIND_LABEL: "attach"}
        self.api = docker.APIClient(version="auto")

    def _create_attach_start(self) -> tuple[str, Any]:
        host_config = self.api.create_host_config(auto_remove=True, **docker_limits(self.cfg))
        created = self.api.create_container(
            self.cfg.image, entrypoint=["bash"], command=["-l"], tty=True, stdin_open=True,
            labels=self.labels, host_config=host_config,
        )
        cid = created["Id"]
        sock = self.api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        self.api.start(cid)
        return cid, getattr(sock, "_sock", sock)

    async def open(self) -> Opened:
        t0 = time.perf_counter()
        cid, sock = await asyncio.to_thread(self._create_attach_start)
        term = await AttachTerm.wrap(sock)
        reader, seconds = await _prompt(term, t0)
        return Opened(term, reader, seconds, cid)

    async def teardown(self) -> None:
        self.api.close()


class Ttyd(System):
    key, title = "ttyd", "ttyd + docker run"

    def __init__(self, url: str, run: str) -> None:
        self.url = url
        self.run = run
        self.http = aiohttp.ClientSession()

    async def open(self) -> Opened:
        t0 = time.perf_counter()
        term = await TtydTerm.connect(self.http, self.url)
        reader, seconds = await _prompt(term, t0)
        cid = await find_container(**{BENCH_LABEL: self.run, KIND_LABEL: "ttyd"})
        return Opened(term, reader, seconds, cid)

    async def teardown(self) -> None:
        await self.http.close()
