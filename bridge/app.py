"""The composition root: builds every component from the config and owns their lifetimes.

Long-lived things live in one `cleanup_ctx` generator, whose cleanup runs if and only if its
startup ran: on shutdown every session ends (reason `killed`) and every container goes.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from . import web_front
from .auth import PamAuthenticator
from .backend import Backend
from .config import Config
from .docker_backend import DockerBackend
from .errors import BridgeError, ConfigError
from .sessions import SessionManager
from .ssh_front import SshDoor

log = logging.getLogger("termbridge")

PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_WEB_ROOT = PACKAGE_ROOT.parent / "web"
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
    app = web.Application(client_max_size=64 * 1024)
    app[web_front.CONFIG] = config
    web_front.setup_routes(app, web_root)

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        ensure_state_dir(config.state_dir)
        gw_backend = backend or DockerBackend(config.session, instance_id(config.state_dir))
        authenticator = PamAuthenticator(config.auth.pam_service, config.auth.allowed_groups, config.auth.pam_workers)
        manager = SessionManager(config, gw_backend)
        secret = read_or_create_secret(config.state_dir / "cookie-secret", secrets.token_bytes(32))
        app[web_front.BACKEND] = gw_backend
        app[web_front.AUTHENTICATOR] = authenticator
        app[web_front.MANAGER] = manager
        app[web_front.LOGINS] = web_front.LoginRegistry(secret)
        if not (web_root / "node_modules" / "@xterm" / "xterm").is_dir():
            log.error("web assets missing: run `npm ci` in %s", web_root)
        try:
            reaped = await manager.reap()
            if reaped:
                log.info("removed %d leftover container(s) of this gateway", reaped)
        except BridgeError as exc:
            log.warning("could not reap leftovers at start: %s", exc.detail)
        ssh_door: SshDoor | None = None
        try:
            if config.ssh.listen is not None:
                ssh_door = SshDoor(config, manager, authenticator)
                await ssh_door.start()
                app[SSH_DOOR] = ssh_door
            yield
        finally:
            if ssh_door is not None:
                ssh_door.stop_listening()
            await web_front.close_websockets(app)
            await manager.close()
            if ssh_door is not None:
                await ssh_door.close()
            authenticator.close()
            await gw_backend.close()

    app.cleanup_ctx.append(gateway)
    return app


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.web.tls_cert is None or config.web.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.web.tls_cert, config.web.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"'web.tls_cert'/'web.tls_key' cannot be loaded: {exc}") from None
    return ctx


def serve(config: Config) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM."""
    ensure_state_dir(config.state_dir)
    host, port = config.web.listen
    web.run_app(
        build_app(config),
        host=host,
        port=port,
        ssl_context=ssl_context(config),
        print=lambda text: log.info("%s", text.strip()),
        shutdown_timeout=5,
        access_log=None,
        handle_signals=True,
    )
