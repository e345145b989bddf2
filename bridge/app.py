"""The composition root: builds every component from the config and owns their lifetimes.

Each long-lived thing (state dir, state store, audit log, Docker backend, PAM pool, session manager, admin
socket, reaper, warm pool, SSH door) has its own `cleanup_ctx` generator, whose cleanup runs if
and only if its startup ran: a failure while starting one releases those already started. On
shutdown `tell_clients` ends every session (reason `killed`) while clients can hear it; the
contexts then release everything, and every container goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import secrets
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

from aiohttp import web, web_response

from . import resources
from . import web as web_door
from .accounts import AccountGuard
from .admin import AdminServer
from .admin import socket_path as admin_socket_path
from .audit import AuditLog, AuditObserver, SessionRecorder
from .auth import PamAuthenticator
from .backends.base import Backend
from .config import LIVE_KEYS, Config, apply_live, changed_keys
from .continuity import recover
from .backends.docker import DockerBackend
from .backends.engine import EngineBackend
from .backends.swarm import SwarmBackend
from .errors import BackendUnavailable, BridgeError, ConfigError
from .metrics import MeteredBackend, Metrics
from .relay import Relay
from .sdnotify import sd_notify
from .sessions import SessionManager
from .ssh_front import SshDoor
from .throttle import LoginThrottle, ThrottledAuthenticator
from .store import open_store
from .web.keys import ACCOUNTS, AUTHENTICATOR, BACKEND, CONFIG, LOGINS, MANAGER, METRICS, RELAY, STORE
from .web.access import ACCESS_LOG, AccessLog
from .web.login import Login, LoginRegistry, end_terminals
from .web.terminal import close_websockets

log = logging.getLogger("termbridge")

REAP_INTERVAL = 30.0
DEFAULT_WEB_ROOT = resources.web_root()
# The SSH door while it runs (absent when `ssh.listen` is empty); `.port` is the bound port.
SSH_DOOR = web.AppKey("ssh_door", SshDoor)
INSTANCE = web.AppKey("instance", str)  # this gateway's id in container labels
AUDIT = web.AppKey("audit", AuditLog)
TLS = web.AppKey("tls", ssl.SSLContext)  # the web door's TLS context, when it serves HTTPS itself


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
    """The wiring: routes now, every long-lived thing in its own cleanup context (started in this
    order, released in the reverse order, and only if it was started)."""
    # aiohttp's default Server header names Python's version and its own; the web door's
    # response hook replaces it, but the 400 for a request that does not parse never reaches a hook.
    web_response.SERVER_SOFTWARE = "termbridge"  # type: ignore[attr-defined]
    app = web.Application(client_max_size=64 * 1024)
    app[CONFIG] = config
    app[METRICS] = Metrics(p.name for p in config.all_profiles())
    web_door.setup_routes(app, web_root)

    async def state_dir(app: web.Application) -> AsyncIterator[None]:
        ensure_state_dir(config.state_dir)
        app[INSTANCE] = instance_id(config.state_dir)
        if config.audit.record_dir is not None:
            SessionRecorder.prepare(config.audit.record_dir)
        if not (web_root / "node_modules" / "@xterm" / "xterm").is_dir():
            log.error("web assets missing: run `npm ci` in %s", web_root)
        yield

    async def state_store(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = await open_store(config)
        app[LOGINS] = LoginRegistry(app[STORE])
        yield
        await app[STORE].close()

    async def audit_log(app: web.Application) -> AsyncIterator[None]:
        app[AUDIT] = AuditLog(config.audit.log, gateway=app[INSTANCE])
        yield
        app[AUDIT].close()

    async def docker_backend(app: web.Application) -> AsyncIterator[None]:
        networks = tuple(p.session.network for p in config.all_profiles())
        engine: Backend = (
            SwarmBackend(config.session, app[INSTANCE], fleet=app[STORE].fleet)
            if config.session.backend == "swarm"
            else DockerBackend(config.session, app[INSTANCE], fleet=app[STORE].fleet, networks=networks)
        )
        metered = MeteredBackend(backend or engine, app[METRICS])
        try:
            await metered.prepare()
        except BackendUnavailable as exc:
            log.warning("Docker unreachable at start; the session network is prepared later: %s", exc.detail)
        except BaseException:
            await metered.close()
            raise
        app[BACKEND] = metered
        yield
        await metered.close()

    async def pam_pool(app: web.Application) -> AsyncIterator[None]:
        app[AUTHENTICATOR] = ThrottledAuthenticator(
            PamAuthenticator(config.auth.pam_service, config.auth.allowed_groups, config.auth.pam_workers),
            LoginThrottle(config.auth, app[STORE]),
        )
        yield
        app[AUTHENTICATOR].close()

    async def sessions(app: web.Application) -> AsyncIterator[None]:
        """Releases whatever sessions are left (none after `tell_clients`; all of them when a
        later resource failed to start). `close` is idempotent."""
        manager = SessionManager(config, app[BACKEND], app[STORE], app[INSTANCE])
        manager.observers.add(AuditObserver(app[AUDIT], config.session.image), app[METRICS])
        if config.audit.record_dir is not None:
            manager.observers.add(
                SessionRecorder(
                    config.audit.record_dir, record_input=config.audit.record_input, limit=config.audit.record_limit,
                    dir_limit=config.audit.record_dir_limit, audit=app[AUDIT],
                )
            )
        app[METRICS].watch(manager)
        app[MANAGER] = manager
        yield
        await manager.close()

    async def account_guard(app: web.Application) -> AsyncIterator[None]:
        """Earlier logins asked again; this gateway's terminals of logins ended on any gateway
        (logout, an account that may no longer log in) end too."""
        guard = AccountGuard(app[MANAGER], app[AUTHENTICATOR], config.auth.account_recheck, app[LOGINS].revoke_user)
        app[ACCOUNTS] = guard

        async def end(login: Login) -> None:
            await end_terminals(app, login, "you logged out")

        tasks = [
            asyncio.create_task(guard.run(), name="account-recheck"),
            asyncio.create_task(app[LOGINS].watch(end), name="login-watch"),
        ]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def admin_socket(app: web.Application) -> AsyncIterator[None]:
        admin = AdminServer(app[MANAGER], admin_socket_path(config.state_dir))
        await admin.start()
        yield
        await admin.close()

    async def adoption(app: web.Application) -> AsyncIterator[None]:
        """Keep the sessions a previous run (or a replica) left in the store, before the reaper
        looks; then keep the store current while serving."""
        manager = app[MANAGER]
        continuity = manager.continuity
        if continuity is None:
            yield
            return
        graces = await recover(
            continuity, partial(container_alive, manager), manager.remove_container, manager.sessions.__contains__
        )
        watch = asyncio.create_task(manager.watch_store(continuity), name="store-watch")
        yield
        for task in (watch, *graces):
            task.cancel()
        await asyncio.gather(watch, *graces, return_exceptions=True)

    async def relay(app: web.Application) -> AsyncIterator[None]:
        """Admins here watching sessions other gateways serve, and the reverse (a shared Redis)."""
        if not app[STORE].relays:
            yield
            return
        app[RELAY] = Relay(app[MANAGER], app[STORE], app[INSTANCE])
        await app[RELAY].start()
        yield
        await app[RELAY].close()

    async def reaper(app: web.Application) -> AsyncIterator[None]:
        await reap_once(app[MANAGER])
        tasks = [
            asyncio.create_task(reap_forever(app[MANAGER]), name="reaper"),
            asyncio.create_task(app[MANAGER].watch_fleet(), name="fleet-watch"),
            asyncio.create_task(app[MANAGER].watch_hosts(), name="host-watch"),
        ]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def warm_pool(app: web.Application) -> AsyncIterator[None]:
        pool = app[MANAGER].pool
        if pool is None:
            yield
            return
        pool.kick()
        yield
        await pool.close()

    async def ssh_door(app: web.Application) -> AsyncIterator[None]:
        if config.ssh.listen is None:
            yield
            return
        door = SshDoor(config, app[MANAGER], app[AUTHENTICATOR])
        await door.start()
        app[SSH_DOOR] = door
        yield
        await door.close()

    app.cleanup_ctx.extend([state_dir, state_store, audit_log, docker_backend, pam_pool, sessions, account_guard,
                            admin_socket, adoption, relay, reaper, warm_pool, ssh_door])
    app.on_shutdown.append(tell_clients)
    return app


async def tell_clients(app: web.Application) -> None:
    """On SIGTERM/SIGINT, before aiohttp drops the connections (cleanup contexts run after it
    did): no new SSH logins, every session ends with reason `killed` while its client can still
    hear why, and the remaining sockets close with GOING_AWAY. Releasing resources is left to
    the cleanup contexts."""
    if SSH_DOOR in app:
        app[SSH_DOOR].stop_listening()
    if MANAGER in app:
        manager = app[MANAGER]  # its config: a reload may have changed on_shutdown
        await manager.close(keep=manager.config.session.on_shutdown == "keep")
    await close_websockets(app)


async def container_alive(manager: SessionManager, container_id: str) -> bool | None:
    """Whether a session's container runs; None when Docker cannot say."""
    try:
        return (await manager.backend.poll(container_id)).running
    except BridgeError as exc:
        log.warning("cannot ask Docker about container %s: %s", container_id[:12], exc.detail)
        return None


async def reap_once(manager: SessionManager) -> None:
    try:
        reaped = await manager.reap()
    except BridgeError as exc:
        log.warning("reaper: %s", exc.detail)
        return
    if reaped:
        log.info("reaper removed %d container(s) no live session owns", reaped)
    swept = await manager.homes.sweep()
    if swept:
        log.info("reaper unmounted %d home(s) no session uses", swept)


async def reap_forever(manager: SessionManager, interval: float = REAP_INTERVAL) -> None:
    """Every `interval`, remove the fleet's containers that no session owns (a crash's
    leftovers, a removal that failed while Docker was down), and release stale slots."""
    while True:
        await asyncio.sleep(interval)
        await reap_once(manager)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.web.tls_cert is None or config.web.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_cert_chain(ctx, config)
    return ctx


def load_cert_chain(ctx: ssl.SSLContext, config: Config) -> None:
    """Into `ctx` (new handshakes use it; a reload calls this again with the renewed files)."""
    try:
        ctx.load_cert_chain(config.web.tls_cert, config.web.tls_key)  # type: ignore[arg-type]
    except (OSError, ssl.SSLError, TypeError) as exc:
        raise ConfigError(f"'web.tls_cert'/'web.tls_key' cannot be loaded: {exc}") from None


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


def reload_config(app: web.Application, load: Callable[[], Config]) -> None:
    """SIGHUP: read the config again and apply the LIVE_KEYS that changed to what starts from
    now on (sessions, logins, TLS handshakes); name the changed keys that need a restart. A
    config that does not load changes nothing."""
    manager = app[MANAGER]
    try:
        new = load()
        merged = apply_live(manager.config, new)
    except ConfigError as exc:
        log.error("reload: configuration error, nothing changed: %s", exc.detail)
        return
    changed = changed_keys(manager.config, new)
    # TLS turns on or off only with a restart; a reload renews the certificate in place.
    renewable = LIVE_KEYS if TLS in app else LIVE_KEYS - {"web.tls_cert", "web.tls_key"}
    fixed = [key for key in changed if key not in renewable]
    live = [key for key in changed if key in renewable]
    if {"web.tls_cert", "web.tls_key"} & set(live):
        try:
            load_cert_chain(app[TLS], merged)
        except ConfigError as exc:
            log.error("reload: %s; the running configuration stays", exc.detail)
            return
    manager.config = merged
    if manager.pool is not None:
        manager.pool.reconfigure(merged.all_profiles())
    inner = getattr(app[BACKEND], "inner", None)
    if isinstance(inner, EngineBackend):
        inner.config = merged.session
    app[AUTHENTICATOR].inner.allowed_groups = frozenset(merged.auth.allowed_groups)
    app[AUTHENTICATOR].throttle.config = merged.auth
    if live:
        log.info("reload: applied %s", ", ".join(live))
    if fixed:
        log.warning("reload: not applied (restart the gateway to change them): %s", ", ".join(fixed))
    if not changed:
        log.info("reload: the configuration is unchanged")


def serve(config: Config, load: Callable[[], Config] | None = None) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM; SIGHUP calls `load` for a new
    config (`reload_config`)."""
    ensure_state_dir(config.state_dir)
    raise_open_file_limit()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(build_app(config), config, load))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        # Like run_app: the main task first (its `finally` shuts the gateway down, and the tasks
        # that work needs must live meanwhile), then whatever is left.
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def _serve(app: web.Application, config: Config, load: Callable[[], Config] | None) -> None:
    """What `web.run_app` does, except that a failed start is cleaned up too (run_app leaves the
    cleanup contexts that did start unreleased when a later one fails)."""
    host, port = config.web.listen
    access = {"access_log_class": AccessLog, "access_log": ACCESS_LOG} if config.log.access else {"access_log": None}
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=3, **access)  # type: ignore[arg-type]
    try:
        tls = ssl_context(config)
        if tls is not None:
            app[TLS] = tls
        await runner.setup()  # starts the cleanup contexts: the SSH door listens after this
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        log.info("Running on %s", site.name)
        if load is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_config, app, load)
        # What start-up made (imported modules, config, the app) lives as long as the gateway:
        # out of the collector's way, so that a full collection walks the sessions' objects only
        # and stays short under a session's keystroke.
        gc.freeze()
        sd_notify("READY=1")  # both doors accept connections now
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        sd_notify("STOPPING=1")
        await runner.cleanup()
