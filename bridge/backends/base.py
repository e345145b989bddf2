"""The backend contract: what starting, stopping and polling a session container means.

Like JupyterHub's spawner contract, every method says what it returns in every state, and the
caller owns timeouts. `DockerBackend` is the one implementation; tests may use a fake here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..config import SessionConfig

LABEL_SESSION = "termbridge.session"
LABEL_USER = "termbridge.user"
LABEL_DOOR = "termbridge.door"
LABEL_GATEWAY = "termbridge.gateway"
LABEL_FLEET = "termbridge.fleet"  # the gateways sharing one store (see Store.fleet)
LABEL_STARTED = "termbridge.started"
LABEL_PROFILE = "termbridge.profile"


@dataclass(frozen=True)
class ContainerSpec:
    """What a session asks of its container. Keys are opaque bytes to the backend."""

    session_id: str
    user: str  # empty for a pooled container: the account comes at claim
    door: str  # web, ssh, or pool
    started: str  # RFC 3339
    authorized_keys: bytes
    host_private_key: bytes
    host_public_key: bytes
    root: bool = False  # `session.user = root`
    uid: int | None = None  # the login's uid on the host; None for a pooled container
    profile: str = "default"  # label termbridge.profile
    # The profile's session settings (image, limits, network, clocks); None: the backend's own.
    settings: SessionConfig | None = None
    home: str = ""  # a persistent home: the host directory mounted at the user's home; "" for none


@dataclass(frozen=True)
class Container:
    """A started container: where its sshd listens and whom to log in as."""

    id: str
    name: str
    address: str
    port: int
    ssh_user: str


@dataclass(frozen=True)
class ContainerState:
    running: bool
    exit_code: int | None = None
    oom_killed: bool = False
    gone: bool = False


@dataclass(frozen=True)
class ContainerStats:
    """One reading of a running container's resource use, as the engine reports it. CPU is the
    container's total CPU time so far: a caller turns two readings into a rate (`cpu_percent`)."""

    cpu_seconds: float
    memory_bytes: int  # in use, page cache the kernel may drop not counted (as `docker stats` shows)
    memory_limit: int  # 0 when the engine reports none
    at: float  # time.monotonic() of the reading


def cpu_percent(before: ContainerStats | None, after: ContainerStats) -> float | None:
    """Percent of one core used between two readings (None without an earlier one)."""
    if before is None or after.at <= before.at or after.cpu_seconds < before.cpu_seconds:
        return None
    return round(100 * (after.cpu_seconds - before.cpu_seconds) / (after.at - before.at), 1)


@dataclass(frozen=True)
class ContainerInfo:
    """One container this gateway instance owns, as the backend sees it."""

    id: str
    name: str
    session_id: str
    user: str
    labels: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    async def ping(self) -> str:
        """Return the engine's version; raise BackendUnavailable when it cannot be reached."""

    async def prepare(self) -> None:
        """Make the shared resources ready (session network, host firewall). Raises
        BackendUnavailable when the engine cannot be reached, another BridgeError when the
        network cannot be made safe; the gateway refuses to start on the latter."""

    async def start(self, spec: ContainerSpec) -> Container:
        """Create, start, isolate, hand over the keys. Returns once the container runs and has an
        address (sshd may still be starting). Raises BackendUnavailable, ImageMissing or
        SessionStartError; on any failure, nothing is left behind."""

    async def claim(self, container: Container, user: str, uid: int, root: bool) -> Container:
        """Hand a pooled container (started with no user) to `user`, whose host uid is `uid`: its
        account is made (the name stays: it never carries the login). Raises SessionStartError;
        the caller removes it on failure."""

    async def stop(self, container_id: str) -> None:
        """Remove the container. Idempotent: an absent container is success."""

    async def poll(self, container_id: str) -> ContainerState:
        """Running, stopped (exit code, OOM-killed) or gone."""

    async def stats(self, container_id: str) -> ContainerStats | None:
        """One reading of the container's CPU and memory use (one sample: Docker may take up to
        a second to give it). None when the container is gone or not running; raises
        BackendUnavailable when the engine cannot be reached. For the admin console, never on a
        session's own path: an implementation must not let these reads delay `start`."""

    async def list_own(self) -> list[ContainerInfo]:
        """Every container labelled with this gateway instance, running or not."""

    async def list_fleet(self) -> list[ContainerInfo]:
        """Every container of this gateway's fleet (every gateway sharing its store), running or not."""

    async def unreachable(self) -> set[str]:
        """Ids of this instance's containers whose host went away (a Swarm node down or gone):
        their sessions cannot go on, though no connection may have noticed yet. Empty on one
        engine (its loss is BackendUnavailable). Raises BackendUnavailable."""

    async def close(self) -> None:
        """Release the engine client."""
