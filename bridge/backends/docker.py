"""The Docker backend: sessions as containers on one engine. With images.py (the image build
and engine facts for the command line), the only modules that import the docker SDK.

Every SDK call runs in this backend's own thread pool. Containers carry the termbridge.* labels, the
session limits and a hardened host config; removal is idempotent (404 and 409 are success).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests.exceptions

from .. import netguard
from .base import (
    LABEL_DOOR,
    LABEL_FLEET,
    LABEL_GATEWAY,
    LABEL_PROFILE,
    LABEL_SESSION,
    LABEL_STARTED,
    LABEL_USER,
    Container,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    ContainerStats,
)
from ..config import UID_SPAN, SessionConfig
from ..errors import BackendUnavailable, ImageMissing, SessionStartError

log = logging.getLogger("termbridge.docker")

T = TypeVar("T")

# What sshd and the entrypoint need, and nothing else (verified one by one against the session
# image: without SETUID, SETGID or SYS_CHROOT sshd's privilege separation fails; without CHOWN the
# entrypoint cannot hand the home directory to the user and sshd cannot chown the pty; without
# AUDIT_WRITE Debian's and Ubuntu's sshd close the connection after login).
SESSION_CAPS = ("CHOWN", "SETUID", "SETGID", "SYS_CHROOT", "AUDIT_WRITE")
RUN_TMPFS_SIZE = 16 * 1024**2
# The container's stdout/stderr is sshd's (-e) debugging output, which a person can make grow
# (junk connections to the container's own sshd: ~150 bytes each). json-file keeps `docker logs`
# working for the admin (its last lines tell why a session died); two files of 512 KiB, rotated,
# bound the host's disk per session (Docker 20.10 keeps a rotated file even with max-file=1).
LOG_FILE_BYTES = 512 * 1024
LOG_FILES = 2
LOG_CONFIG = {"type": "json-file", "config": {"max-size": str(LOG_FILE_BYTES), "max-file": str(LOG_FILES)}}
# How the session image expects to be set up (label `termbridge.protocol`); 2: keys on stdin,
# accounts on tmpfs, read-only root. An image built from an older session-image/ would wait for
# keys that never come, so it is refused with a clear message instead. 4: the account's uid comes
# from the gateway (TERMBRIDGE_UID; `termbridge-adduser USER UID` at claim). 5: the session holder
# (tb-holder) is the main process and enforces TERMBRIDGE_IDLE_TIMEOUT and TERMBRIDGE_MAX_LIFETIME.
# 6: a pooled container is claimed over its stdin, kept open after the keys ("USER UID" in,
# "termbridge-claim ok" out), and its sshd lets the account in without a reload.
IMAGE_PROTOCOL = "6"
CLAIM_TIMEOUT = 10.0
CLAIM_ANSWER = re.compile(rb"^termbridge-claim (ok|failed: .*)$", re.M)
# Optional abilities an image states in the label `termbridge.features` (comma-separated), asked
# for only by the sessions that need them. persistent-home: termbridge-adduser takes a home that
# is already there (bound by the gateway, the person's own) instead of making one.
FEATURE_PERSISTENT_HOME = "persistent-home"
NETWORK_NAMES = {"isolated": "termbridge-isolated", "internet": "termbridge-internet"}
SSHD_PORT = 22
# Docker (20.10) answers a one-shot stats request at its next sampling, up to a second later: the
# admin console's reads wait in a pool of their own, so they never delay a session's start.
STATS_WORKERS = 16


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        now = time.time()
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, now
            info.uid = info.gid = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _stats_from(raw: dict[str, Any], at: float) -> ContainerStats | None:
    """The engine's stats document as a reading; None for a container that does not run (its
    document has no CPU or memory figures)."""
    cpu = (raw.get("cpu_stats") or {}).get("cpu_usage") or {}
    memory = raw.get("memory_stats") or {}
    if "total_usage" not in cpu or "usage" not in memory:
        return None
    extra = memory.get("stats") or {}
    # What `docker stats` shows: page cache the kernel may reclaim is not the session's use.
    cache = extra.get("inactive_file", extra.get("total_inactive_file", 0))
    used = max(0, int(memory["usage"]) - int(cache))
    return ContainerStats(int(cpu["total_usage"]) / 1e9, used, int(memory.get("limit") or 0), at)


def _home_mount(spec: ContainerSpec) -> docker.types.Mount:
    if spec.root or not spec.user:
        raise SessionStartError(detail="a persistent home needs a login-mode session with its user")
    return docker.types.Mount(
        target=f"/home/{spec.user}", source=spec.home, type="bind", read_only=False, propagation="rprivate"
    )


class ClaimChannel:
    """A pooled container's stdin and stdout, attached before its start and kept after the keys:
    the login that claims it sends "USER UID" here and reads the account's answer. No `docker
    exec` (three API calls and a process Docker sets up) on the way to a login's prompt."""

    def __init__(self, attached: Any, raw: socket.socket) -> None:
        self._attached = attached
        self._raw = raw

    async def claim(self, user: str, uid: int) -> str:
        """Send the claim; the answer line (`ok` or `failed: why`). Raises OSError when the
        container's end goes away first. Docker frames the output: 8-byte headers, stdout is 1."""
        loop = asyncio.get_running_loop()
        self._raw.setblocking(False)
        await loop.sock_sendall(self._raw, f"{user} {uid}\n".encode())
        buf, out = b"", b""
        while True:
            data = await loop.sock_recv(self._raw, 4096)
            if not data:
                raise OSError(f"the container's stdout closed before it answered: {out[-300:]!r}")
            buf += data
            while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[4:8], "big"):
                size = int.from_bytes(buf[4:8], "big")
                if buf[0] == 1:
                    out += buf[8 : 8 + size]
                buf = buf[8 + size :]
            if found := CLAIM_ANSWER.search(out):
                return found[1].decode(errors="replace")

    def close(self) -> None:
        self._attached.close()


class DockerBackend:
    def __init__(
        self,
        config: SessionConfig,
        instance_id: str,
        *,
        fleet: str = "",
        base_url: str | None = None,
        workers: int = 16,
        networks: tuple[str, ...] = (),
    ) -> None:
        """`networks`: the session.network modes of every profile, prepared by `prepare`
        (default: `config.network`'s); a spec's settings may ask for any of them."""
        self.config = config
        self.instance_id = instance_id
        self.fleet = fleet or instance_id
        self.networks = tuple(dict.fromkeys(networks or (config.network,)))
        self._base_url = base_url
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._stats_pool = ThreadPoolExecutor(max_workers=STATS_WORKERS, thread_name_prefix="docker-stats")
        self._client: docker.APIClient | None = None
        self._client_lock = threading.Lock()
        self._bridges: dict[str, str] = {}  # network mode -> its host bridge, once prepared
        self._prepare_lock = threading.Lock()
        self._checked_from: dict[str, float] = {}  # network mode -> when its last passed check began
        self._claims: dict[str, ClaimChannel] = {}  # pooled containers' open stdin, by container id

    # -- plumbing ---------------------------------------------------------------------------

    def _api(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
                if self._base_url:
                    kwargs["base_url"] = self._base_url
                self._client = docker.APIClient(
                    version="auto", timeout=60, max_pool_size=self._workers + STATS_WORKERS, **kwargs
                )
            return self._client

    def _forget_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
            self._bridges.clear()
            self._checked_from.clear()
        if client is not None:
            client.close()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in the pool; turn "engine unreachable" into BackendUnavailable."""
        return await self._call_in(self._pool, fn, *args, **kwargs)

    async def _call_in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
                if isinstance(exc, docker.errors.APIError):
                    raise
                self._forget_client()
                raise BackendUnavailable(detail=f"Docker engine unreachable: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(pool, run)

    # -- contract -----------------------------------------------------------------------------

    async def ping(self) -> str:
        def version() -> str:
            return str(self._api().version().get("Version", "unknown"))

        return await self._call(version)

    def _settings(self, spec: ContainerSpec) -> SessionConfig:
        return spec.settings or self.config

    def _network_info(self, api: docker.APIClient, network: str) -> dict[str, Any]:
        """The session network, created on first use; an existing one must have our settings."""
        isolated = network == "isolated"
        name = NETWORK_NAMES[network]
        found = [n for n in api.networks(names=[name]) if n["Name"] == name]
        if not found:
            log.info("creating network %s", name)
            try:
                api.create_network(
                    name,
                    driver="bridge",
                    internal=isolated,
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    labels={"termbridge.network": network},
                    check_duplicate=True,
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
        info = api.inspect_network(name)
        options = info.get("Options") or {}
        wrong = []
        if bool(info.get("Internal")) != isolated:
            wrong.append(f"internal={info.get('Internal')}")
        if options.get("com.docker.network.bridge.enable_icc") != "false":
            wrong.append("inter-container traffic on")
        if info.get("EnableIPv6"):
            wrong.append("IPv6 on")
        if info.get("Driver") != "bridge":
            wrong.append(f"driver {info.get('Driver')}")
        if wrong:
            raise netguard.NetworkGuardError(
                detail=f"network {name} exists with settings that break session.network="
                f"{network} ({', '.join(wrong)}); remove it (docker network rm {name})"
            )
        return info

    def _prepare_sync(self, api: docker.APIClient | None = None, networks: tuple[str, ...] = ()) -> None:
        """Networks (`networks`, default every profile's), route tools and firewall. Cached; the
        firewall is re-checked for every call, so rules flushed behind the gateway's back come
        back before the next session starts. Starts that ask at once share one check: a check
        of a network begun after a call asked answers for it too (a class starting together
        waits for two checks, not for one after another each)."""
        api = api or self._api()
        asked = time.monotonic()
        with self._prepare_lock:
            for network in networks or self.networks:
                if self._checked_from.get(network, asked) > asked:
                    continue
                began = time.monotonic()
                self._prepare_locked(api, network)
                self._checked_from[network] = began

    def _prepare_locked(self, api: docker.APIClient, network: str) -> None:
        name = NETWORK_NAMES[network]
        bridge = self._bridges.get(network)
        if bridge is None:
            info = self._network_info(api, network)
            bridge = (info.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{info['Id'][:12]}"
            if network == "isolated":
                netguard.require_tools("nsenter", "ip")
            if self.config.firewall:
                netguard.require_tools("iptables", "iptables-restore", "ip6tables-restore", "nsenter", "ip")
                netguard.guard_bridge(bridge)
            else:
                log.warning("session.firewall is off: session containers can reach host ports on %s", bridge)
            log.info("session network %s on %s: %s, firewall %s", name, bridge,
                     network, "on" if self.config.firewall else "OFF")
            self._bridges[network] = bridge
        elif self.config.firewall and not netguard.bridge_guarded(bridge):
            log.warning("firewall rules for %s were missing; installing them again", bridge)
            netguard.guard_bridge(bridge)

    async def prepare(self) -> None:
        await self._call(self._prepare_sync)

    def _egress(self, cfg: SessionConfig) -> netguard.Egress:
        """What this container may reach, read afresh (the host's networks and resolvers change)."""
        if cfg.network == "isolated":
            return netguard.Egress()
        resolvers = cfg.dns or netguard.upstream_resolvers()
        if not resolvers:
            log.warning("no name server for internet-mode sessions (set session.dns): they get no DNS")
        blocked = (*netguard.PRIVATE_NETWORKS, *netguard.host_networks())
        return netguard.Egress(blocked=blocked, allowed=cfg.internet_allow, resolvers=resolvers)

    def _host_config(self, api: docker.APIClient, cfg: SessionConfig, spec: ContainerSpec) -> dict[str, Any]:
        """Limits and hardening; a persistent home is the one host directory a container gets
        (its own file system, the person's alone: homes.py), bound over the tmpfs /home."""
        root = spec.root
        tmp = f"rw,exec,nosuid,nodev,size={cfg.tmpfs_size}"
        tmpfs = {"/run": f"rw,noexec,nosuid,nodev,size={RUN_TMPFS_SIZE},mode=0755", "/tmp": f"{tmp},mode=1777"}
        if not root:
            tmpfs["/home"] = f"{tmp},mode=0755"
        return api.create_host_config(
            nano_cpus=int(cfg.cpus * 1e9),
            mem_limit=cfg.memory,
            memswap_limit=cfg.memory,
            pids_limit=cfg.pids,
            cap_drop=["ALL"],
            cap_add=list(SESSION_CAPS),
            security_opt=["no-new-privileges"],
            network_mode=NETWORK_NAMES[cfg.network],
            init=True,
            privileged=False,
            read_only=not root,
            tmpfs=tmpfs,
            log_config=LOG_CONFIG,
            mounts=[_home_mount(spec)] if spec.home else None,
        )

    def _boot(self, api: docker.APIClient, cid: str, spec: ContainerSpec) -> None:
        """Start the container, cut its default route, then hand the entrypoint its keys on stdin.
        sshd cannot start before the keys arrive, so no shell ever runs with the route in place;
        the keys never touch a disk or `docker inspect`. A pooled container's stdin (and stdout)
        stays open for its claim."""
        keys = _tar(
            {
                "ssh_host_ed25519_key": (spec.host_private_key, 0o600),
                "ssh_host_ed25519_key.pub": (spec.host_public_key, 0o644),
                "authorized_keys": (spec.authorized_keys, 0o644),
            }
        )
        pooled = not spec.user and not spec.root
        attached = api.attach_socket(cid, params={"stdin": 1, "stdout": int(pooled), "stream": 1})
        raw = getattr(attached, "_sock", attached)
        try:
            api.start(cid)
            info = api.inspect_container(cid)
            pid = int(info["State"].get("Pid") or 0)
            cfg = self._settings(spec)
            if cfg.network == "isolated":
                netguard.drop_default_routes(pid)
            if self.config.firewall:
                egress = self._egress(cfg)
                netguard.guard_container(pid, egress)
                if cfg.network == "internet":
                    self._write_resolv_conf(info["ResolvConfPath"], egress)
            raw.settimeout(10)
            raw.sendall(keys)
            if pooled:
                self._claims[cid] = ClaimChannel(attached, raw)
                return
            raw.shutdown(socket.SHUT_WR)
        except BaseException:
            self._claims.pop(cid, None)
            raise
        finally:
            if cid not in self._claims:
                attached.close()

    @staticmethod
    def _write_resolv_conf(path: str, egress: netguard.Egress) -> None:
        """Docker's file on the host, bind-mounted (read-only in login mode) on the container's
        /etc/resolv.conf; written in place so the mount sees it. It names 127.0.0.11, which the
        container's filter rules shut; root mode may edit it, that resolver stays shut."""
        try:
            with open(path, "w") as resolv:
                resolv.write(netguard.resolv_conf(egress))
        except OSError as exc:
            raise SessionStartError(detail=f"writing the container's resolv.conf ({path}) failed: {exc}") from exc

    def _check_image(self, api: docker.APIClient, image: str, spec: ContainerSpec) -> None:
        try:
            labels = api.inspect_image(image)["Config"].get("Labels") or {}
        except docker.errors.NotFound as exc:
            raise ImageMissing(detail=f"session image {image!r} not found: {exc}") from exc
        found = labels.get("termbridge.protocol")
        if found != IMAGE_PROTOCOL:
            raise ImageMissing(
                "the session image on this server is out of date; ask the admin to rebuild it",
                detail=f"session image {image!r} has termbridge.protocol={found!r}, this gateway needs "
                f"{IMAGE_PROTOCOL!r}: rebuild it with `termbridge image build`",
            )
        features = (labels.get("termbridge.features") or "").split(",")
        if spec.home and FEATURE_PERSISTENT_HOME not in features:
            raise ImageMissing(
                "the session image on this server cannot keep your home directory; ask the admin to rebuild it",
                detail=f"session image {image!r} lacks {FEATURE_PERSISTENT_HOME!r} in termbridge.features "
                "(session.home = persistent): rebuild it with `termbridge image build`",
            )

    def _environment(self, spec: ContainerSpec) -> dict[str, str]:
        """The entrypoint's settings; the holder inside ends the session on its own after the idle
        timeout with no gateway attached, and at the maximum lifetime, if no gateway is left to."""
        cfg = self._settings(spec)
        return {
            "TERMBRIDGE_USER": spec.user,
            "TERMBRIDGE_UID": "" if spec.root or not spec.user else str(self._session_uid(spec.user, spec.uid)),
            "TERMBRIDGE_MODE": "root" if spec.root else "login",
            "TERMBRIDGE_IDLE_TIMEOUT": str(max(1, round(cfg.idle_timeout))),
            "TERMBRIDGE_MAX_LIFETIME": str(max(1, round(cfg.max_lifetime))),
            "TERMBRIDGE_HOME": "persistent" if spec.home else "ephemeral",
        }

    def _start_sync(self, spec: ContainerSpec) -> Container:
        api = self._api()
        cfg = self._settings(spec)
        network_name = NETWORK_NAMES[cfg.network]
        self._prepare_sync(api, (cfg.network,))
        self._check_image(api, cfg.image, spec)
        short = spec.session_id[:8]
        # Not the login: names are what Docker's DNS and `docker ps` show; the user is in a label.
        name = f"termbridge-{short}"
        labels = {
            LABEL_SESSION: spec.session_id,
            LABEL_USER: spec.user,
            LABEL_DOOR: spec.door,
            LABEL_GATEWAY: self.instance_id,
            LABEL_FLEET: self.fleet,
            LABEL_STARTED: spec.started,
            LABEL_PROFILE: spec.profile,
        }
        try:
            created = api.create_container(
                cfg.image,
                name=name,
                hostname=f"tb-{short}",
                labels=labels,
                environment=self._environment(spec),
                host_config=self._host_config(api, cfg, spec),
                stdin_open=True,  # the keys come this way; with detach=False, Docker closes it after them
                detach=False,
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(detail=f"session image {cfg.image!r} not found: {exc}") from exc
        except docker.errors.APIError as exc:
            if exc.status_code == 404 and "network" in str(exc).lower():
                self._bridges.pop(cfg.network, None)
                self._checked_from.pop(cfg.network, None)
            elif exc.status_code == 404:
                raise ImageMissing(detail=f"session image {cfg.image!r} not found: {exc}") from exc
            raise SessionStartError(detail=f"create failed: {exc}") from exc
        cid = created["Id"]
        try:
            self._boot(api, cid, spec)
            info = api.inspect_container(cid)
            address = info["NetworkSettings"]["Networks"][network_name]["IPAddress"]
            if not address:
                raise SessionStartError(detail=f"container {cid[:12]} has no address on {network_name}")
        except BaseException as exc:
            self._remove_sync(cid)
            if isinstance(exc, docker.errors.APIError):
                raise SessionStartError(detail=f"start failed: {exc}") from exc
            if isinstance(exc, OSError):
                raise SessionStartError(detail=f"handing the keys to {cid[:12]} failed: {exc!r}") from exc
            raise
        ssh_user = "root" if spec.root else spec.user
        return Container(id=cid, name=name, address=address, port=SSHD_PORT, ssh_user=ssh_user)

    async def start(self, spec: ContainerSpec) -> Container:
        return await self._call(self._start_sync, spec)

    def _session_uid(self, user: str, host_uid: int | None) -> int:
        """The uid of `user`'s shell: uid_base + their host uid, theirs alone (config.py checks
        that no host account, group or subordinate range has one in that range)."""
        if host_uid is None or not 0 <= host_uid < UID_SPAN:
            raise SessionStartError(
                "your account cannot have a session on this server; ask the admin",
                detail=f"{user}'s host uid {host_uid} is outside 0..{UID_SPAN - 1}, which session uids map",
            )
        return self.config.uid_base + host_uid

    async def claim(self, container: Container, user: str, uid: int, root: bool) -> Container:
        """The account is made by the container itself, told over the stdin this backend kept
        open (`ClaimChannel`); its sshd already lets the account in."""
        claimed = Container(container.id, container.name, container.address, container.port, "root" if root else user)
        channel = self._claims.pop(container.id, None)
        if root:
            if channel is not None:
                channel.close()
            return claimed
        if channel is None:
            raise SessionStartError(detail=f"claiming {container.name}: no claim channel (not pooled by this gateway)")
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT):
                answer = await channel.claim(user, self._session_uid(user, uid))
        except (OSError, TimeoutError) as exc:
            raise SessionStartError(detail=f"claiming {container.name} for {user} failed: {exc!r}") from exc
        finally:
            channel.close()
        if answer != "ok":
            raise SessionStartError(detail=f"claiming {container.name} for {user} {answer}")
        return claimed

    def _remove_sync(self, container_id: str) -> None:
        channel = self._claims.pop(container_id, None)
        if channel is not None:
            channel.close()
        try:
            self._api().remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                raise

    async def stop(self, container_id: str) -> None:
        await self._call(self._remove_sync, container_id)

    def _poll_sync(self, container_id: str) -> ContainerState:
        try:
            state = self._api().inspect_container(container_id)["State"]
        except docker.errors.NotFound:
            return ContainerState(running=False, gone=True)
        return ContainerState(
            running=bool(state.get("Running")),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            gone=state.get("Status") == "removing",
        )

    async def poll(self, container_id: str) -> ContainerState:
        return await self._call(self._poll_sync, container_id)

    def _stats_sync(self, container_id: str) -> ContainerStats | None:
        try:
            raw = self._api().stats(container_id, stream=False, one_shot=True)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # not running
                return None
            raise
        return _stats_from(raw, time.monotonic())

    async def stats(self, container_id: str) -> ContainerStats | None:
        return await self._call_in(self._stats_pool, self._stats_sync, container_id)

    def _list_sync(self, label: str, value: str) -> list[ContainerInfo]:
        found = self._api().containers(all=True, filters={"label": [f"{label}={value}"]})
        return [
            ContainerInfo(
                id=c["Id"],
                name=(c.get("Names") or ["?"])[0].lstrip("/"),
                session_id=c["Labels"].get(LABEL_SESSION, ""),
                user=c["Labels"].get(LABEL_USER, ""),
                labels=dict(c["Labels"]),
            )
            for c in found
        ]

    async def list_own(self) -> list[ContainerInfo]:
        return await self._call(self._list_sync, LABEL_GATEWAY, self.instance_id)

    async def list_fleet(self) -> list[ContainerInfo]:
        return await self._call(self._list_sync, LABEL_FLEET, self.fleet)

    async def close(self) -> None:
        for channel in self._claims.values():
            channel.close()
        self._claims.clear()
        self._forget_client()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stats_pool.shutdown(wait=False, cancel_futures=True)
