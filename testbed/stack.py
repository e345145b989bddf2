"""The shipped Swarm stack (etc/swarm/termbridge.yml) deployed on the test cluster: gateways from
the gateway image on the manager, Redis and the nginx front from a local image, the secrets and the
session network as an admin makes them, a config for tests; clients reach the gateways at the
manager's address, where the front publishes its ports."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import docker
import docker.errors

from testbed.gateway import free_port
from testbed.gateway_image import ROOT, ensure_gateway_image
from testbed.swarm import MANAGER_HOST_ETC, Node, SwarmCluster

log = logging.getLogger("testbed.stack")

STACK_FILE = ROOT / "etc" / "swarm" / "termbridge.yml"
SERVICES_IMAGE = "termbridge/test-stack-services:bookworm"
BASE_IMAGE = "termbridge/test-base:bookworm"
SESSION_NETWORK = "termbridge-sessions"
# Debian's redis-server and nginx on the local base (no registry serves redis:7 or nginx here):
# the stack's store and front both run this image.
SERVICES_DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server nginx libnginx-mod-stream \\
 && rm -rf /var/lib/apt/lists/*
"""
SECRETS = ("termbridge_store_key", "termbridge_ssh_host_key")


def ensure_services_image(host: docker.DockerClient) -> str:
    """Built once per base image (the label records which)."""
    base_id = host.images.get(BASE_IMAGE).id
    try:
        if host.images.get(SERVICES_IMAGE).labels.get("termbridge.testbed.base") == base_id:
            return SERVICES_IMAGE
    except docker.errors.ImageNotFound:
        pass
    subprocess.run(["docker", "build", "-q", "--label", f"termbridge.testbed.base={base_id}", "-t", SERVICES_IMAGE, "-"],
                   input=SERVICES_DOCKERFILE, text=True, check=True, capture_output=True, timeout=600)
    return SERVICES_IMAGE


@dataclass
class Stack:
    """One deployment of the stack file under `name` on `cluster`'s manager."""

    cluster: SwarmCluster
    name: str
    config: Path  # the gateways' termbridge.toml
    replicas: int = 2
    config_version: int = 1  # raise it before deploying a changed config again
    web_port: int = field(default_factory=free_port)
    ssh_port: int = field(default_factory=free_port)
    gateway_image: str = ""

    @property
    def manager(self) -> Node:
        return self.cluster.manager

    @property
    def web_url(self) -> str:
        return f"http://{self.manager.address}:{self.web_port}"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DOCKER_HOST": self.manager.url,
            "TERMBRIDGE_GATEWAY_IMAGE": self.gateway_image,
            "TERMBRIDGE_REDIS_IMAGE": SERVICES_IMAGE,
            "TERMBRIDGE_PROXY_IMAGE": SERVICES_IMAGE,
            "TERMBRIDGE_REPLICAS": str(self.replicas),
            "TERMBRIDGE_WEB_PORT": str(self.web_port),
            "TERMBRIDGE_SSH_PORT": str(self.ssh_port),
            "TERMBRIDGE_ACCOUNTS": MANAGER_HOST_ETC,
            "TERMBRIDGE_CONFIG": str(self.config),
            "TERMBRIDGE_CONFIG_VERSION": str(self.config_version),
        }

    def deploy(self) -> Stack:
        """Create the secrets (as an admin does), deploy, and wait for every replica's /healthz.
        Again (after `config_version` was raised): Swarm rolls the gateways to the new config."""
        began = time.monotonic()
        self.gateway_image = self.gateway_image or ensure_gateway_image()
        ensure_services_image(self.cluster.host)
        built = time.monotonic()
        self.cluster.load(self.gateway_image, SERVICES_IMAGE, nodes=[self.manager])
        loaded = time.monotonic()
        mgr = self.manager.client()
        if not mgr.networks.list(names=[SESSION_NETWORK]):
            mgr.networks.create(SESSION_NETWORK, driver="overlay", internal=True, attachable=True)
        host_key = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
        for name, data in zip(SECRETS, (secrets.token_bytes(32), host_key)):
            if not mgr.secrets.list(filters={"name": name}):
                mgr.secrets.create(name=name, data=data, labels={"termbridge.testbed": self.name})
        subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), self.name],
                       env=self._env(), check=True, capture_output=True, text=True, timeout=120)
        self.wait_healthy()
        log.info("stack %s: images built in %.1f s, loaded in %.1f s, healthy %.1f s after deploy", self.name,
                 built - began, loaded - built, time.monotonic() - loaded)
        return self

    def service(self, role: str) -> docker.models.services.Service:
        return self.manager.client().services.get(f"{self.name}_{role}")

    def running_tasks(self, role: str = "gateway") -> list[dict]:
        return [t for t in self.service(role).tasks(filters={"desired-state": "running"})
                if t["Status"]["State"] == "running"]

    def wait_healthy(self, timeout: float = 240.0) -> None:
        """Every gateway replica running and healthy (its healthcheck reaches /healthz), any
        rolling update done, and the front answering /healthz."""
        deadline = time.monotonic() + timeout
        while True:
            update = (self.service("gateway").attrs.get("UpdateStatus") or {}).get("State", "completed")
            healthy = [c for c in self.gateway_containers() if c.attrs["State"].get("Health", {}).get("Status") == "healthy"]
            if (update in ("completed", "rollback_completed") and len(healthy) >= self.replicas
                    and len(self.running_tasks()) >= self.replicas and self._front_ok()):
                return
            if time.monotonic() > deadline:
                tasks = [(t["Status"]["State"], t["Status"].get("Err", "")) for t in self.service("gateway").tasks()]
                raise RuntimeError(f"stack {self.name}: gateways not healthy in {timeout} s: {tasks}")
            time.sleep(1)

    def _front_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.web_url}/healthz", timeout=3) as resp:
                return resp.status == 200
        except OSError:
            return False

    def gateway_containers(self) -> list[docker.models.containers.Container]:
        return self.manager.client().containers.list(filters={"label": f"com.docker.swarm.service.name={self.name}_gateway"})

    def logs(self, role: str = "gateway") -> str:
        done = subprocess.run(["docker", "-H", self.manager.url, "service", "logs", "--raw", f"{self.name}_{role}"],
                              capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr

    def remove(self) -> None:
        """The stack, session services left behind, its volumes, secrets and networks; waits until
        no task container is left."""
        subprocess.run(["docker", "-H", self.manager.url, "stack", "rm", self.name], capture_output=True, timeout=120)
        mgr = self.manager.client()
        # Sessions a failed test left running (gateways keep them when they stop): the cluster is
        # the tests' own, so every session service on it belongs to this stack.
        for service in mgr.services.list(filters={"label": "termbridge.session"}):
            service.remove()
        for secret in mgr.secrets.list(filters={"label": "termbridge.session"}):
            try:
                secret.remove()
            except docker.errors.APIError:
                pass
        deadline = time.monotonic() + 60
        while mgr.containers.list(all=True, filters={"label": f"com.docker.stack.namespace={self.name}"}):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        deadline = time.monotonic() + 90  # a volume stays in use until its container is gone (vfs: slow)
        while volumes := mgr.volumes.list(filters={"label": f"com.docker.stack.namespace={self.name}"}):
            for volume in volumes:
                try:
                    volume.remove(force=True)
                except docker.errors.APIError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        for name in SECRETS:
            try:
                mgr.secrets.get(name).remove()
            except docker.errors.APIError:
                pass
        for net in mgr.networks.list(filters={"label": f"com.docker.stack.namespace={self.name}"}):
            try:
                net.remove()
            except docker.errors.APIError:
                pass
