"""The Swarm backend: each session is a Swarm service (one replica, no restart) that Swarm's
scheduler places on a node (spread, `session.placement` constraints; drained nodes get none).

The gateway talks to a manager's API only: it cannot enter a container's network namespace on
another node or write to its stdin. So the keys travel as a Swarm secret (mounted on the task's
/run tmpfs, removed with the service) and the session image guards its own network
(TERMBRIDGE_NETGUARD=self: nftables while the entrypoint holds NET_ADMIN, which it then drops
from every capability set, with no_new_privs, before sshd starts). Sessions and gateways share one
internal overlay network: no default route, and every session only answers SSH from it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker import types

from ..config import SessionConfig
from ..errors import BackendUnavailable, ImageMissing, SessionStartError
from ..netguard import NetworkGuardError
from ..upstream import SessionKeys, Upstream
from .base import (
    LABEL_FLEET, LABEL_GATEWAY, LABEL_SESSION, LABEL_USER, Container, ContainerInfo, ContainerSpec, ContainerState,
    ContainerStats,
)
from .engine import FEATURE_SWARM, LOG_OPTIONS, SESSION_CAPS, EngineBackend, keys_tar, started, tmpfs_options

log = logging.getLogger("termbridge.swarm")

# NET_ADMIN is for the entrypoint alone: it installs the session's filter, then drops it for good
# from the bounding set, which takes SETPCAP (dropped with it).
ENTRYPOINT_CAPS = ("NET_ADMIN", "SETPCAP")
SWARM_CAPS = (*SESSION_CAPS, *ENTRYPOINT_CAPS)
KEYS_FILE = "termbridge-keys"
# Task states after which the container no longer runs (Docker's swarm/api TaskState).
ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
TASK_POLL = 0.2
# Node states in which a node runs nothing we can reach (Docker's swarm/api NodeStatus). Not
# "unknown": a newly elected leader marks every node that is not down "unknown" until it
# reports in again (quorum back after a loss, a leader restarted); a node that does not report
# within the grace period is then marked "down" by Swarm itself.
NODE_GONE = {"down", "disconnected"}
T = TypeVar("T")


# How managers that cannot act answer: no leader (503), or a change no majority commits (the
# raft proposal's deadline passes, or the leader steps down under it).
NO_QUORUM = ("does not have a leader", "deadline exceeded", "lost leadership", "no elected cluster leader")


def no_quorum(exc: docker.errors.APIError) -> bool:
    text = f"{exc.explanation or ''} {exc}".lower()
    return exc.status_code == 503 or any(words in text for words in NO_QUORUM)


class SwarmUnavailable(BackendUnavailable):
    """The managers cannot act (no leader: quorum lost, or an election under way). Running
    sessions need no manager and go on; only changes to the swarm wait."""

    user_message = "new sessions cannot start right now while the cluster recovers; try again in a few minutes"


def service_spec(
    config: SessionConfig, name: str, hostname: str, labels: dict[str, str], env: dict[str, str], secret_id: str,
    root: bool,
) -> dict[str, Any]:
    """The create_service arguments of one session: limits, labels on the service and its
    container, capabilities, read-only root, tmpfs mounts, no restart, placement, the overlay."""
    # Swarm's tmpfs mounts take a size and a mode only (API 1.41): Docker mounts them noexec, so
    # scripts in /tmp and the home directory run as `sh FILE`, not `./FILE`. (An anonymous local
    # volume of type tmpfs would take `exec`, but Docker 20.10 leaves such volumes behind.)
    mounts = [
        types.Mount(target=path, source=None, type="tmpfs", tmpfs_size=size, tmpfs_mode=mode)
        for path, (size, mode, _runnable) in tmpfs_options(config, root).items()
    ]
    container = types.ContainerSpec(
        config.image,
        hostname=hostname,
        env={**env, "TERMBRIDGE_KEYS_FILE": f"/run/secrets/{KEYS_FILE}", "TERMBRIDGE_NETGUARD": "self"},
        labels=labels,
        mounts=mounts,
        secrets=[types.SecretReference(secret_id, f"{name}-keys", filename=KEYS_FILE, uid="0", gid="0", mode=0o400)],
        read_only=not root,
        init=True,
        cap_add=list(SWARM_CAPS),
        cap_drop=["ALL"],
        stop_signal="SIGTERM",
    )
    resources = types.Resources(cpu_limit=int(config.cpus * 1e9), mem_limit=config.memory)
    resources["Limits"]["Pids"] = config.pids
    template = types.TaskTemplate(
        container,
        resources=resources,
        restart_policy=types.RestartPolicy(condition="none"),
        placement=types.Placement(constraints=list(config.placement), preferences=[("spread", "node.id")]),
        log_driver=types.DriverConfig("json-file", LOG_OPTIONS),
        networks=[config.swarm_network],
    )
    return {
        "task_template": template,
        "name": name,
        "labels": labels,
        "mode": types.ServiceMode("replicated", replicas=1),
        "endpoint_spec": types.EndpointSpec(mode="dnsrr"),
    }


class SwarmBackend(EngineBackend):
    def __init__(self, config: SessionConfig, instance_id: str, **engine: Any) -> None:
        """`engine`: EngineBackend's fleet, base_url and workers."""
        super().__init__(config, instance_id, **engine)
        self.network_name = config.swarm_network
        self._network_ok = False
        self._prepare_lock = threading.Lock()
        self._claims: dict[str, SessionKeys] = {}  # pooled service id → its claim key

    # -- network -------------------------------------------------------------------------------

    def _prepare_sync(self, api: docker.APIClient | None = None) -> None:
        """The engine is a Swarm manager and the session overlay exists (created internal and
        attachable if missing) with settings that keep sessions off the outside."""
        api = api or self._api()
        with self._prepare_lock:
            if self._network_ok:
                return
            swarm = api.info().get("Swarm") or {}
            if not swarm.get("ControlAvailable"):
                raise NetworkGuardError(
                    detail=f"session.backend = swarm needs a Swarm manager's API; this engine's swarm state is "
                    f"{swarm.get('LocalNodeState')!r}, manager: {bool(swarm.get('ControlAvailable'))}"
                )
            found = [n for n in api.networks(names=[self.network_name]) if n["Name"] == self.network_name]
            if not found:
                log.info("creating overlay network %s", self.network_name)
                try:
                    api.create_network(self.network_name, driver="overlay", internal=True, attachable=True,
                                       labels={"termbridge.network": "swarm"}, check_duplicate=True)
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:
                        raise
            info = self._inspect_network(api)
            wrong = []
            if info.get("Driver") != "overlay":
                wrong.append(f"driver {info.get('Driver')}")
            if not info.get("Internal"):
                wrong.append("not internal (sessions would get a default route)")
            if info.get("EnableIPv6"):
                wrong.append("IPv6 on")
            if wrong:
                raise NetworkGuardError(
                    detail=f"network {self.network_name} exists with settings that break session isolation "
                    f"({', '.join(wrong)}); remove it (docker network rm {self.network_name})"
                )
            log.info("session overlay %s (%s)", self.network_name, info.get("Id", "")[:12])
            self._network_ok = True

    def _inspect_network(self, api: docker.APIClient) -> dict[str, Any]:
        """Right after its creation a manager may report the overlay without its driver for a
        moment: asked again until it has one (or 10 s passed, and the caller names what is wrong)."""
        deadline = time.monotonic() + 10
        while True:
            info = api.inspect_network(self.network_name, scope="swarm")
            if info.get("Driver") or time.monotonic() > deadline:
                return info
            time.sleep(TASK_POLL)

    async def prepare(self) -> None:
        await self._call(self._prepare_sync)

    def _forget_client(self) -> None:
        super()._forget_client()
        self._network_ok = False

    # -- start ---------------------------------------------------------------------------------

    def _start_sync(self, spec: ContainerSpec) -> Container:
        api = self._api()
        self._prepare_sync(api)
        cfg = self._settings(spec)
        self._check_image(api, cfg.image, (FEATURE_SWARM,))
        short = spec.session_id[:8]
        name = f"termbridge-{short}"
        labels = self._labels(spec)
        secret_id = ""
        service_id = ""
        # A pooled login-mode container gets its account at claim, over SSH with a key of its own.
        claim = SessionKeys.for_claim(spec.host_private_key) if not spec.user and not spec.root else None
        more = {"claim_key.pub": claim.authorized_keys} if claim else {}
        try:
            secret_id = api.create_secret(f"{name}-keys", keys_tar(spec, **more), labels=labels)["ID"]
            created = api.create_service(
                **service_spec(cfg, name, f"tb-{short}", labels, self._environment(spec), secret_id, spec.root)
            )
            service_id = created["ID"]
            address = self._wait_running(api, service_id)
        except BaseException as exc:
            self._remove_sync(service_id, [secret_id] if secret_id else [])
            if isinstance(exc, docker.errors.APIError) and not no_quorum(exc):
                if exc.status_code == 404 and "network" not in str(exc).lower():
                    raise ImageMissing(detail=f"session image {cfg.image!r}: {exc}") from exc
                if exc.status_code == 404:
                    self._network_ok = False
                raise SessionStartError(detail=f"service {name}: {exc}") from exc
            raise
        if claim is not None:
            self._claims[service_id] = claim
        return started(service_id, name, address, spec)

    def _wait_running(self, api: docker.APIClient, service_id: str) -> str:
        """The task's address on the overlay once its container runs. Bounded by
        session.start_timeout: a thread cannot be cancelled, so it owns its own deadline."""
        deadline = time.monotonic() + self.config.start_timeout
        while True:
            task = self._task(api, service_id)
            if task is not None:
                status = task.get("Status") or {}
                state = status.get("State", "")
                if state == "running":
                    return self._address(task)
                if state in ENDED:
                    reason = status.get("Err") or status.get("Message")
                    if "no such image" in str(reason).lower():  # the image check could only ask the manager
                        raise ImageMissing(detail=f"node {self._hostname(api, task)} has no session image: {reason}")
                    raise SessionStartError(detail=f"task of {service_id[:12]} {state}: {reason}")
            if time.monotonic() > deadline:
                where = (task or {}).get("Status", {}).get("Message", "no task")
                raise SessionStartError(
                    "no server had room for your session; try again in a moment",
                    detail=f"service {service_id[:12]} not running after {self.config.start_timeout:.0f} s ({where}); "
                    "nodes full, drained, or not matching session.placement?",
                )
            time.sleep(TASK_POLL)

    @staticmethod
    def _hostname(api: docker.APIClient, task: dict[str, Any]) -> str:
        try:
            return str(api.inspect_node(task["NodeID"])["Description"]["Hostname"])
        except (KeyError, docker.errors.APIError):
            return str(task.get("NodeID") or "?")

    def _address(self, task: dict[str, Any]) -> str:
        for attachment in task.get("NetworksAttachments") or []:
            if (attachment.get("Network") or {}).get("Spec", {}).get("Name") == self.network_name:
                for address in attachment.get("Addresses") or []:
                    return str(address).split("/")[0]
        raise SessionStartError(detail=f"task {task.get('ID', '?')[:12]} has no address on {self.network_name}")

    @staticmethod
    def _task(api: docker.APIClient, service_id: str) -> dict[str, Any] | None:
        """The service's newest task (one replica, no restart: there is one)."""
        tasks = api.tasks(filters={"service": service_id})
        if not tasks:
            return None
        return max(tasks, key=lambda t: t.get("CreatedAt", ""))

    # -- claim, stop, poll, list -------------------------------------------------------------------

    async def claim(self, container: Container, user: str, uid: int, root: bool) -> Container:
        """No `docker exec` reaches a task on another node: the gateway logs in as root with the
        claim key it made at start, whose forced command (termbridge-claim) makes the account
        and then allows only that user."""
        if root:
            return dataclasses.replace(container, ssh_user="root")
        keys = self._claims.pop(container.id, None)
        if keys is None:
            raise SessionStartError(detail=f"no claim key for pooled {container.name}: not started by this gateway")
        command = f"{user} {self._session_uid(user, uid)}"
        code, output = await Upstream.run_once(
            dataclasses.replace(container, ssh_user="root"), keys, command, self.config.start_timeout
        )
        if code != 0:
            raise SessionStartError(detail=f"claiming {container.name} for {user} failed ({code}): {output!r}")
        return dataclasses.replace(container, ssh_user=user)

    def _remove_sync(self, service_id: str, secrets: list[str] | None = None) -> None:
        """The service, then its secrets (in use until the service is gone). Idempotent."""
        api = self._api()
        if service_id:
            try:
                spec = api.inspect_service(service_id)["Spec"]
                refs = spec["TaskTemplate"]["ContainerSpec"].get("Secrets") or []
                secrets = [*(secrets or []), *(r["SecretID"] for r in refs)]
                api.remove_service(service_id)
            except docker.errors.NotFound:
                pass
        for secret in set(secrets or []):
            try:
                api.remove_secret(secret)
            except docker.errors.NotFound:
                pass

    async def stop(self, container_id: str) -> None:
        self._claims.pop(container_id, None)
        await self._call(self._remove_sync, container_id)

    def _poll_sync(self, service_id: str) -> ContainerState:
        api = self._api()
        try:
            api.inspect_service(service_id)
            task = self._task(api, service_id)
        except docker.errors.NotFound:  # also when the service goes between the two calls
            return ContainerState(running=False, gone=True)
        if task is None:
            return ContainerState(running=True)
        status = task.get("Status") or {}
        exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
        if status.get("State") in ENDED:
            return ContainerState(running=False, exit_code=exit_code)
        node = task.get("NodeID")
        if node and status.get("State") == "running":
            try:
                if api.inspect_node(node)["Status"]["State"] == "down":
                    return ContainerState(running=False, gone=True)
            except docker.errors.NotFound:
                return ContainerState(running=False, gone=True)
        return ContainerState(running=True)

    async def poll(self, container_id: str) -> ContainerState:
        return await self._call(self._poll_sync, container_id)

    async def stats(self, container_id: str) -> ContainerStats | None:
        """None: a manager's API has no stats of a task's container on another node (the
        console shows no figures for Swarm sessions)."""
        return None

    def _list_sync(self, label: str, value: str) -> list[ContainerInfo]:
        api = self._api()
        services = api.services(filters={"label": f"{label}={value}"})
        live = {s["Spec"]["Labels"].get(LABEL_SESSION) for s in services}
        for secret in api.secrets(filters={"label": f"{label}={value}"}):
            if (secret["Spec"].get("Labels") or {}).get(LABEL_SESSION) not in live:
                try:
                    api.remove_secret(secret["ID"])
                except docker.errors.APIError as exc:
                    log.warning("secret %s of a removed session stays: %s", secret["Spec"]["Name"], exc)
        return [
            ContainerInfo(
                id=s["ID"],
                name=s["Spec"]["Name"],
                session_id=s["Spec"]["Labels"].get(LABEL_SESSION, ""),
                user=s["Spec"]["Labels"].get(LABEL_USER, ""),
                labels=dict(s["Spec"]["Labels"]),
            )
            for s in services
        ]

    async def list_own(self) -> list[ContainerInfo]:
        return await self._call(self._list_sync, LABEL_GATEWAY, self.instance_id)

    def _unreachable_sync(self) -> set[str]:
        """This instance's services whose task is on a node that is down or no longer in the
        swarm (it left, or was removed): three list calls, however many sessions there are. A
        node in state "unknown" (a new leader has not heard from it yet) is not gone."""
        api = self._api()
        nodes = {n["ID"]: (n.get("Status") or {}).get("State", "unknown") for n in api.nodes()}
        mine = {s["ID"] for s in api.services(filters={"label": f"{LABEL_GATEWAY}={self.instance_id}"})}
        if not mine:
            return set()
        try:
            tasks = api.tasks(filters={"service": sorted(mine)})
        except docker.errors.NotFound:  # one of them was removed since the list: ask next round
            return set()
        newest: dict[str, dict[str, Any]] = {}
        for task in tasks:
            held = newest.get(task.get("ServiceID", ""))
            if held is None or task.get("CreatedAt", "") > held.get("CreatedAt", ""):
                newest[task.get("ServiceID", "")] = task
        # Swarm may already have set a lost task's desired state to shutdown: its node decides.
        return {
            service for service, task in newest.items()
            if service in mine and task.get("NodeID") and nodes.get(task["NodeID"], "down") in NODE_GONE
        }

    async def unreachable(self) -> set[str]:
        return await self._call(self._unreachable_sync)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """As the engine's, and a manager that answers 503 (no leader) or not at all (a write
        that a majority of managers must commit) is SwarmUnavailable."""
        try:
            return await super()._call(fn, *args, **kwargs)
        except docker.errors.APIError as exc:
            if no_quorum(exc):
                raise SwarmUnavailable(detail=f"Swarm managers cannot act: {exc.explanation}") from exc
            raise
        except requests.exceptions.Timeout as exc:  # a change the managers cannot commit
            raise SwarmUnavailable(detail=f"Swarm managers did not answer: {exc}") from exc

    async def list_fleet(self) -> list[ContainerInfo]:
        return await self._call(self._list_sync, LABEL_FLEET, self.fleet)
