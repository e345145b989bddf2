"""The composition root: builds every component from the config and owns their lifetimes.

Long-lived things live in one `cleanup_ctx` generator, whose cleanup runs if and only if its
startup ran: on shutdown every session ends (reason `killed`) and every container goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web, web_response

from . import resources, web_files, web_front
from .admin import AdminServer
from .admin import socket_path as admin_socket_path
from .audit import AuditLog, AuditObserver, SessionRecorder
from .auth import PamAuthenticator
from .backend import Backend
from .config import Config
from .docker_backend import DockerBackend
from .errors import BackendUnavailable, BridgeError, ConfigError
from .metrics import MeteredBackend, Metrics
from .sessions import SessionManager
from .ssh_front import SshDoor
from .throttle import LoginThrottle, ThrottledAuthenticator

log = logging.getLogger("termbridge")

REAP_INTERVAL = 30.0
DEFAULT_WEB_ROOT = resources.web_root()
# The SSH door while it runs (absent when `ssh.listen` is empty); `.port` is the bound port.
SSH_DOOR = web.AppKey("ssh_door", SshDoor)


def ensure_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(f"'state_dir' {str(path)!r} cannot be created: {exc.strerror}") from None


def read_or_create_secret(path: Path, make: bytes) -> bytes:
    """A small secret file, 0600, created once; the same value on every restart."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(make)
    return make


def instance_id(state_dir: Path) -> str:
    """This gateway's identity in container labels; stable across restarts so that a restarted
    gateway reaps what its previous run left."""
    return read_or_create_secret(state_dir / "instance-id", secrets.token_hex(8).encode()).decode().strip()


def build_app(
    config: Config,
    *,
    backend: Backend | None = None,
    web_root: Path = DEFAULT_WEB_ROOT,
) -> web.Application:
    # aiohttp's default Server header names Python's version and its own; the web door's
    # response hook replaces it, but the 400 for a request that does not parse never reaches a hook.
    web_response.SERVER_SOFTWARE = "termbridge"  # type: ignore[attr-defined]
    app = web.Application(client_max_size=64 * 1024)
    app[web_front.CONFIG] = config
    web_front.setup_routes(app, web_root)
    web_files.setup_routes(app)

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        ensure_state_dir(config.state_dir)
        instance = instance_id(config.state_dir)
        if config.audit.record_dir is not None:
            SessionRecorder.prepare(config.audit.record_dir)
        audit = AuditLog(config.audit.log, gateway=instance)
        metrics = Metrics()
        gw_backend = MeteredBackend(backend or DockerBackend(config.session, instance), metrics)
        try:
            await gw_backend.prepare()
        except BackendUnavailable as exc:
            log.warning("Docker unreachable at start; the session network is prepared later: %s", exc.detail)
        except BaseException:
            await gw_backend.close()
            raise
        authenticator = ThrottledAuthenticator(
            PamAuthenticator(config.auth.pam_service, config.auth.allowed_groups, config.auth.pam_workers),
            LoginThrottle(config.auth),
        )
        manager = SessionManager(config, gw_backend)
        manager.observers += [AuditObserver(audit, config.session.image), metrics]
        if config.audit.record_dir is not None:
            manager.observers.append(
                SessionRecorder(
                    config.audit.record_dir, record_input=config.audit.record_input, limit=config.audit.record_limit,
                    dir_limit=config.audit.record_dir_limit, audit=audit,
                )
            )
        metrics.watch(manager)
        app[web_front.METRICS] = metrics
        secret = read_or_create_secret(config.state_dir / "cookie-secret", secrets.token_bytes(32))
        app[web_front.BACKEND] = gw_backend
        app[web_front.AUTHENTICATOR] = authenticator
        app[web_front.MANAGER] = manager
        app[web_front.LOGINS] = web_front.LoginRegistry(secret)
        if not (web_root / "node_modules" / "@xterm" / "xterm").is_dir():
            log.error("web assets missing: run `npm ci` in %s", web_root)
        admin = AdminServer(manager, admin_socket_path(config.state_dir))
        await admin.start()
        await reap_once(manager)
        manager.start_pool()
        reaper = asyncio.create_task(reap_forever(manager), name="reaper")
        ssh_door: SshDoor | None = None
        try:
            if config.ssh.listen is not None:
                ssh_door = SshDoor(config, manager, authenticator)
                await ssh_door.start()
                app[SSH_DOOR] = ssh_door
            yield
        finally:
            reaper.cancel()
            await admin.close()
            if ssh_door is not None:
                ssh_door.stop_listening()
            await manager.close()
            await web_front.close_websockets(app)
            if ssh_door is not None:
                await ssh_door.close()
            authenticator.close()
            await gw_backend.close()
            audit.close()

    async def drain(app: web.Application) -> None:
        """On SIGTERM/SIGINT, before connections are torn down: every session ends with reason
        `killed` while its socket can still hear it, and every container goes."""
        if SSH_DOOR in app:
            app[SSH_DOOR].stop_listening()
        if web_front.MANAGER in app:
            await app[web_front.MANAGER].close()

    app.cleanup_ctx.append(gateway)
    app.on_shutdown.append(drain)
    return app


async def reap_once(manager: SessionManager) -> None:
    try:
        reaped = await manager.reap()
    except BridgeError as exc:
        log.warning("reaper: %s", exc.detail)
        return
    if reaped:
        log.info("reaper removed %d container(s) no live session owns", reaped)


async def reap_forever(manager: SessionManager, interval: float = REAP_INTERVAL) -> None:
    """Docker is the source of truth: every `interval`, remove this instance's containers that
    no live session owns (a crash's leftovers, a removal that failed while Docker was down)."""
    while True:
        await asyncio.sleep(interval)
        await reap_once(manager)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.web.tls_cert is None or config.web.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.web.tls_cert, config.web.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"'web.tls_cert'/'web.tls_key' cannot be loaded: {exc}") from None
    return ctx


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one: each idle connection holds a descriptor
    (two for a session), and the usual soft limit of 1024 runs out at about a thousand. The
    systemd unit raises the hard limit (LimitNOFILE); this covers any other way of starting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("open-file limit raised from %d to %d", soft, hard)
    return hard


def serve(config: Config) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM."""
    ensure_state_dir(config.state_dir)
    raise_open_file_limit()
    host, port = config.web.listen
    web.run_app(
        build_app(config),
        host=host,
        port=port,
        ssl_context=ssl_context(config),
        print=lambda text: log.info("%s", text.strip()),
        shutdown_timeout=3,
        access_log=None,
        handle_signals=True,
    )
