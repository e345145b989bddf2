"""The Docker backend: sessions as containers on one engine. With images.py (the image build
and engine facts for the command line), the only modules that import the docker SDK.

Every SDK call runs in this backend's own thread pool. Containers carry the termbridge.* labels, the
session limits and a hardened host config; removal is idempotent (404 and 409 are success).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from typing import Any

import docker
import docker.errors
import docker.types

from .. import netguard
from ..config import SessionConfig
from ..errors import ImageMissing, SessionStartError
from .base import (
    LABEL_FLEET, LABEL_GATEWAY, LABEL_SESSION, LABEL_USER, Container, ContainerInfo, ContainerSpec, ContainerState,
    ContainerStats,
)
from .engine import (
    FEATURE_PERSISTENT_HOME, IMAGE_PROTOCOL, LOG_CONFIG, LOG_FILE_BYTES, LOG_FILES, SESSION_CAPS, EngineBackend,
    keys_tar, started, tmpfs_mount_options, tmpfs_options,
)

__all__ = [
    "FEATURE_PERSISTENT_HOME", "IMAGE_PROTOCOL", "LOG_FILE_BYTES", "LOG_FILES", "NETWORK_NAMES", "SESSION_CAPS",
    "DockerBackend",
]

log = logging.getLogger("termbridge.docker")

NETWORK_NAMES = {"isolated": "termbridge-isolated", "internet": "termbridge-internet"}


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


CLAIM_TIMEOUT = 10.0
CLAIM_ANSWER = re.compile(rb"^termbridge-claim (ok|failed: .*)$", re.M)


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


class DockerBackend(EngineBackend):
    def __init__(self, config: SessionConfig, instance_id: str, *, networks: tuple[str, ...] = (), **engine: Any) -> None:
        """`networks`: the session.network modes of every profile, prepared by `prepare`
        (default: `config.network`'s); a spec's settings may ask for any of them. `engine`:
        EngineBackend's fleet, base_url and workers."""
        super().__init__(config, instance_id, **engine)
        self.networks = tuple(dict.fromkeys(networks or (config.network,)))
        self._bridges: dict[str, str] = {}  # network mode -> its host bridge, once prepared
        self._prepare_lock = threading.Lock()
        self._checked_from: dict[str, float] = {}  # network mode -> when its last passed check began
        self._claims: dict[str, ClaimChannel] = {}  # pooled containers' open stdin, by container id

    def _forget_client(self) -> None:
        super()._forget_client()
        self._bridges.clear()
        self._checked_from.clear()

    # -- contract -----------------------------------------------------------------------------

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
        tmpfs = {path: f"rw,{tmpfs_mount_options(*options)}" for path, options in tmpfs_options(cfg, root).items()}
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
        keys = keys_tar(spec)
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

    def _start_sync(self, spec: ContainerSpec) -> Container:
        api = self._api()
        cfg = self._settings(spec)
        network_name = NETWORK_NAMES[cfg.network]
        self._prepare_sync(api, (cfg.network,))
        self._check_image(api, cfg.image, (FEATURE_PERSISTENT_HOME,) if spec.home else ())
        short = spec.session_id[:8]
        # Not the login: names are what Docker's DNS and `docker ps` show; the user is in a label.
        name = f"termbridge-{short}"
        labels = self._labels(spec)
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
        return started(cid, name, address, spec)

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
        await super().close()

    async def unreachable(self) -> set[str]:
        return set()  # one engine: every container's host is this one
