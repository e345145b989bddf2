"""What the Docker and the Swarm backends share: the engine client in its own thread pool, and the
session's container settings that do not depend on where it runs (labels, environment, session
uid, the key bundle, the image check, capabilities, tmpfs sizes, log rotation)."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from ..config import UID_SPAN, SessionConfig
from ..errors import BackendUnavailable, ImageMissing, SessionStartError
from .base import (
    LABEL_DOOR, LABEL_FLEET, LABEL_GATEWAY, LABEL_PROFILE, LABEL_SESSION, LABEL_STARTED, LABEL_USER, Container,
    ContainerSpec,
)

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
LOG_OPTIONS = {"max-size": str(LOG_FILE_BYTES), "max-file": str(LOG_FILES)}
LOG_CONFIG = {"type": "json-file", "config": LOG_OPTIONS}
# How the session image expects to be set up (label `termbridge.protocol`); 2: keys on stdin,
# accounts on tmpfs, read-only root. An image built from an older session-image/ would wait for
# keys that never come, so it is refused with a clear message instead. 4: the account's uid comes
# from the gateway (TERMBRIDGE_UID; `termbridge-adduser USER UID` at claim). 5: the session holder
# (tb-holder) is the main process and enforces TERMBRIDGE_IDLE_TIMEOUT and TERMBRIDGE_MAX_LIFETIME.
# 6: a pooled container on one engine is claimed over its stdin, kept open after the keys ("USER
# UID" in, "termbridge-claim ok" out), and its sshd lets the account in without a reload.
IMAGE_PROTOCOL = "6"
# Optional abilities an image states in the label `termbridge.features` (comma-separated), asked
# for only by the sessions that need them. persistent-home: termbridge-adduser takes a home that
# is already there (bound by the gateway, the person's own) instead of making one. swarm: the
# entrypoint reads its keys from a file and guards its own network (the Swarm backend).
FEATURE_PERSISTENT_HOME = "persistent-home"
FEATURE_SWARM = "swarm"
SSHD_PORT = 22
# Docker (20.10) answers a one-shot stats request at its next sampling, up to a second later: the
# admin console's reads wait in a pool of their own, so they never delay a session's start.
STATS_WORKERS = 16


def keys_tar(spec: ContainerSpec, **more: bytes) -> bytes:
    """The session's keys as the entrypoint reads them: a tar of three files (and `more`)."""
    files = {
        "ssh_host_ed25519_key": (spec.host_private_key, 0o600),
        "ssh_host_ed25519_key.pub": (spec.host_public_key, 0o644),
        "authorized_keys": (spec.authorized_keys, 0o644),
        **{name: (data, 0o644) for name, data in more.items()},
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        now = time.time()
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, now
            info.uid = info.gid = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tmpfs_options(config: SessionConfig, root: bool) -> dict[str, tuple[int, int, bool]]:
    """Mount point → (size, mode, exec): /run for sshd and the keys, /tmp, and the home
    directories on a read-only root (login mode)."""
    mounts = {"/run": (RUN_TMPFS_SIZE, 0o755, False), "/tmp": (config.tmpfs_size, 0o1777, True)}
    if not root:
        mounts["/home"] = (config.tmpfs_size, 0o755, True)
    return mounts


def tmpfs_mount_options(size: int, mode: int, runnable: bool) -> str:
    """The mount options of one of those tmpfs, as mount(8) takes them."""
    return f"size={size},mode={mode:04o},{'exec' if runnable else 'noexec'},nosuid,nodev"


def started(container_id: str, name: str, address: str, spec: ContainerSpec) -> Container:
    """What start() returns: where sshd listens and whom the gateway logs in as."""
    return Container(container_id, name, address, SSHD_PORT, "root" if spec.root else spec.user)


class EngineBackend:
    """The engine client, created on first use, and every SDK call in this backend's own pool."""

    def __init__(
        self,
        config: SessionConfig,
        instance_id: str,
        *,
        fleet: str = "",
        base_url: str | None = None,
        workers: int = 16,
    ) -> None:
        self.config = config
        self.instance_id = instance_id
        self.fleet = fleet or instance_id
        self._base_url = base_url
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._stats_pool = ThreadPoolExecutor(max_workers=STATS_WORKERS, thread_name_prefix="docker-stats")
        self._client: docker.APIClient | None = None
        self._client_lock = threading.Lock()

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

    def _start_sync(self, spec: ContainerSpec) -> Container:
        raise NotImplementedError

    async def start(self, spec: ContainerSpec) -> Container:
        return await self._call(self._start_sync, spec)

    async def ping(self) -> str:
        def version() -> str:
            return str(self._api().version().get("Version", "unknown"))

        return await self._call(version)

    async def close(self) -> None:
        self._forget_client()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stats_pool.shutdown(wait=False, cancel_futures=True)

    # -- the session's settings, wherever it runs --------------------------------------------

    def _settings(self, spec: ContainerSpec) -> SessionConfig:
        """The session's profile's settings, or the [session] section's."""
        return spec.settings or self.config

    def _labels(self, spec: ContainerSpec) -> dict[str, str]:
        # Not the login in the name: names are what Docker's DNS and `docker ps` show.
        return {
            LABEL_SESSION: spec.session_id,
            LABEL_USER: spec.user,
            LABEL_DOOR: spec.door,
            LABEL_GATEWAY: self.instance_id,
            LABEL_FLEET: self.fleet,
            LABEL_STARTED: spec.started,
            LABEL_PROFILE: spec.profile,
        }

    def _check_image(self, api: docker.APIClient, image: str, features: tuple[str, ...] = ()) -> None:
        """The image exists, speaks this gateway's protocol and states the `features` asked for."""
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
        stated = (labels.get("termbridge.features") or "").split(",")
        missing = [f for f in features if f not in stated]
        if missing:
            why = "keep your home directory" if FEATURE_PERSISTENT_HOME in missing else "run on this cluster"
            raise ImageMissing(
                f"the session image on this server cannot {why}; ask the admin to rebuild it",
                detail=f"session image {image!r} lacks {', '.join(missing)} in termbridge.features: "
                "rebuild it with `termbridge image build`",
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

    def _session_uid(self, user: str, host_uid: int | None) -> int:
        """The uid of `user`'s shell: uid_base + their host uid, theirs alone (config.py checks
        that no host account, group or subordinate range has one in that range)."""
        if host_uid is None or not 0 <= host_uid < UID_SPAN:
            raise SessionStartError(
                "your account cannot have a session on this server; ask the admin",
                detail=f"{user}'s host uid {host_uid} is outside 0..{UID_SPAN - 1}, which session uids map",
            )
        return self.config.uid_base + host_uid
