"""A Docker Swarm the tests own: three Docker engines (one manager, two workers), each a
docker-in-docker container on a test-owned bridge network of the host engine.

No registry is reachable here, so images go into every engine with `docker save | docker load`.
Each node's API listens on its address on that network only (plain TCP: nothing else is on it).
What works on this machine: no --privileged (CAP_SYS_RESOURCE is outside the bounding set), so
every other capability, no seccomp/AppArmor profile, writable /sys and the host's cgroup tree;
dockerd inside uses the vfs driver and puts its containers under the cgroup /<node name>.

`TB_SWARM_KEEP=1` keeps the cluster (named `tb-swarm`, or `$TB_SWARM_NAME`) between runs and reuses it when it is
healthy; otherwise every node, its volume and the network go when the run ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

log = logging.getLogger("testbed.swarm")

NODE_IMAGE = "termbridge/test-swarm-node:bookworm"
NODE_CONTEXT = Path(__file__).resolve().parent / "swarm-node"
BASE_IMAGE = os.environ.get("TB_SWARM_BASE", "termbridge/test-base:bookworm")
LABEL = "termbridge.testbed"
API_PORT = 2375
KEEP = os.environ.get("TB_SWARM_KEEP") == "1"
NODE_ARGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
]
# Managers see the host's /etc here, read-only: gateways deployed as a stack mount it for PAM, so
# the accounts that testbed.accounts makes on the host log in through them.
MANAGER_HOST_ETC = "/host-etc"


@dataclass(frozen=True)
class Node:
    """One engine of the cluster: its container on the host and its API address."""

    name: str
    address: str
    role: str  # manager | worker

    @property
    def url(self) -> str:
        return f"tcp://{self.address}:{API_PORT}"

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version="auto", timeout=timeout)


def _docker(*args: str, check: bool = True, host: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", *(["-H", host] if host else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class SwarmCluster:
    """Start, reuse, load images into, and remove the test cluster."""

    def __init__(self, name: str | None = None, workers: int = 2) -> None:
        self.name = name or os.environ.get("TB_SWARM_NAME") or ("tb-swarm" if KEEP else f"tb-swarm-{os.getpid()}")
        self.node_names = [f"{self.name}-m1", *(f"{self.name}-w{i}" for i in range(1, workers + 1))]
        self.network = self.name
        self.host = docker.from_env(timeout=120)
        self.nodes: list[Node] = []
        self.start_seconds = 0.0

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, images: Iterable[str] = ()) -> SwarmCluster:
        """Bring the cluster up (or reuse a kept one) with `images` loaded on every node."""
        began = time.monotonic()
        self._build_node_image()
        if not (KEEP and self._reuse()):
            self.remove()
            self._create()
        self.load(*images)
        self.start_seconds = time.monotonic() - began
        log.info("swarm %s ready in %.1f s: %s", self.name, self.start_seconds,
                 ", ".join(f"{n.name}={n.address}" for n in self.nodes))
        return self

    def close(self) -> None:
        """Remove everything, unless TB_SWARM_KEEP=1 asked to keep the cluster for the next run."""
        if KEEP:
            log.info("keeping swarm %s (TB_SWARM_KEEP=1)", self.name)
            return
        self.remove()

    def remove(self) -> None:
        """Every node container, its volume and the network. Idempotent."""
        for name in self.node_names:
            try:
                self.host.containers.get(name).remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            try:
                self.host.volumes.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        for net in self.host.networks.list(names=[self.network]):
            net.remove()

    def _build_node_image(self) -> None:
        """Built once and cached by tag; rebuilt when the base image changed under it."""
        try:
            node = self.host.images.get(NODE_IMAGE)
            base = self.host.images.get(BASE_IMAGE)
            if node.labels.get("termbridge.testbed.base") == base.id:
                return
        except docker.errors.ImageNotFound:
            pass
        base_id = self.host.images.get(BASE_IMAGE).id
        _docker("build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "--label", f"termbridge.testbed.base={base_id}",
                "-t", NODE_IMAGE, str(NODE_CONTEXT))

    def _create(self) -> None:
        self.host.networks.create(self.network, driver="bridge", labels={LABEL: "swarm"})
        for i, name in enumerate(self.node_names):
            self.host.volumes.create(name, labels={LABEL: "swarm"})
            host_etc = ["-v", f"/etc:{MANAGER_HOST_ETC}:ro"] if i == 0 else []
            _docker("run", "-d", "--name", name, "--hostname", name, "--network", self.network,
                    "--label", f"{LABEL}=swarm", "-e", f"TB_NODE={name}", *NODE_ARGS,
                    "-v", f"{name}:/var/lib/docker", *host_etc, NODE_IMAGE)
        self.nodes = [self._node(name, "manager" if i == 0 else "worker") for i, name in enumerate(self.node_names)]
        for node in self.nodes:
            self._wait_api(node)
        mgr = self.manager.client()
        mgr.swarm.init(advertise_addr=self.manager.address, listen_addr=f"{self.manager.address}:2377")
        token = mgr.swarm.attrs["JoinTokens"]["Worker"]
        for node in self.workers:
            node.client().swarm.join(remote_addrs=[f"{self.manager.address}:2377"], join_token=token,
                                     advertise_addr=node.address, listen_addr=f"{node.address}:2377")
        self._wait_ready()

    def _node(self, name: str, role: str) -> Node:
        info = self.host.api.inspect_container(name)
        address = info["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        return Node(name=name, address=address, role=role)

    def _reuse(self) -> bool:
        """A kept cluster is reused only if every node runs and the manager sees all of them ready."""
        try:
            running = all(self.host.containers.get(n).status == "running" for n in self.node_names)
        except docker.errors.NotFound:
            return False
        if not running:
            return False
        self.nodes = [self._node(name, "manager" if i == 0 else "worker") for i, name in enumerate(self.node_names)]
        try:
            self._wait_ready(timeout=10)
        except (RuntimeError, docker.errors.DockerException):
            return False
        for node in self.nodes:  # a node drained by an earlier run takes sessions again
            self.set_availability(node, "active")
        return True

    @staticmethod
    def _wait_api(node: Node, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                node.client(timeout=5).ping()
                return
            except (docker.errors.DockerException, OSError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd on {node.name} did not come up: {exc}") from exc
                time.sleep(0.3)

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s == "ready" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"swarm nodes not ready: {states}")
            time.sleep(0.3)

    # -- what tests use -----------------------------------------------------------------------

    def node_states(self) -> dict[str, str]:
        """Hostname → state as the manager sees it."""
        return {n.attrs["Description"]["Hostname"]: n.attrs["Status"]["State"] for n in self.manager.client().nodes.list()}

    def node(self, hostname: str) -> Node:
        return next(n for n in self.nodes if n.name == hostname)

    def set_availability(self, node: Node, availability: str) -> None:
        """`active`, `pause` or `drain`, as `docker node update --availability` sets it."""
        self._update_spec(node, Availability=availability)

    def set_role(self, node: Node, role: str) -> None:
        """`manager` or `worker`, as `docker node promote/demote` sets it (Node.role stays the
        cluster's plan: tests put it back)."""
        self._update_spec(node, Role=role)

    def _update_spec(self, node: Node, **changes: str) -> None:
        """The node's spec with `changes`, against its current version: Swarm refuses an update
        "out of sequence" when the node changed meanwhile (its status after a leader election,
        say): then the read and the update go again."""
        for attempt in range(20):
            swarm_node = next(n for n in self.manager.client().nodes.list()
                              if n.attrs["Description"]["Hostname"] == node.name)
            try:
                swarm_node.update(dict(swarm_node.attrs["Spec"], **changes))
                return
            except docker.errors.APIError as exc:
                if "out of sequence" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.5)

    def load(self, *images: str, nodes: Iterable[Node] | None = None) -> None:
        """Copy images from the host engine into every node (or `nodes`) that lacks that exact image."""
        wanted = [(image, self.host.images.get(image).id) for image in images]

        def load_into(node: Node) -> None:
            client = node.client(timeout=300)
            for image, image_id in wanted:
                try:
                    if client.images.get(image).id == image_id:
                        continue
                except docker.errors.ImageNotFound:
                    pass
                save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
                try:
                    subprocess.run(["docker", "-H", node.url, "load", "-q"], stdin=save.stdout, check=True,
                                   capture_output=True)
                finally:
                    if save.stdout is not None:
                        save.stdout.close()
                    if save.wait() != 0:
                        raise RuntimeError(f"docker save {image} failed")

        targets = list(self.nodes if nodes is None else nodes)
        with ThreadPoolExecutor(len(targets)) as pool:
            list(pool.map(load_into, targets))

    def host_address(self) -> str:
        """The host's address on the cluster's network (its gateway)."""
        return self.host.networks.get(self.network).attrs["IPAM"]["Config"][0]["Gateway"]

    def leftovers(self, label: str = "termbridge.session") -> dict[str, list[str]]:
        """Services and secrets carrying `label`, and per node the containers carrying it and the
        volumes no container uses. (The host engine's containers: conftest's leak check.)"""
        found: dict[str, list[str]] = {}
        mgr = self.manager.client()
        found["services"] = [s.name for s in mgr.services.list(filters={"label": label})]
        found["secrets"] = [s.name for s in mgr.secrets.list(filters={"label": label})]
        for node in self.nodes:
            client = node.client()
            found[node.name] = [c.name for c in client.containers.list(all=True, filters={"label": label}, ignore_removed=True)]
            found[f"{node.name} volumes"] = [v.name for v in client.volumes.list(filters={"dangling": True})]
        return {k: v for k, v in found.items() if v}

    def wait_gone(self, timeout: float = 60) -> None:
        """Until the nodes removed what removed services left (vfs removal takes seconds)."""
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
