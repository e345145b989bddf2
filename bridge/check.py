"""`termbridge check`: find out what is wrong before users do.

One line per check: `ok`, `warn` or `FAIL`, what was found, and for a failure how to fix it.
Any FAIL makes the exit status 1; warnings do not. Nothing here changes the system: ports are
probed by binding and closing, directories by creating and removing a probe file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import homes, resources
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .errors import BackendUnavailable, ConfigError, StoreUnavailable

PAM_DIRS = (Path("/etc/pam.d"), Path("/usr/lib/pam.d"))


@dataclass(frozen=True)
class Check:
    status: str  # ok, warn, FAIL
    name: str
    message: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def ok(name: str, message: str) -> Check:
    return Check("ok", name, message)


def warn(name: str, message: str, fix: str = "") -> Check:
    return Check("warn", name, message, fix)


def fail(name: str, message: str, fix: str) -> Check:
    return Check("FAIL", name, message, fix)


def _config_arg(path: str | None) -> str:
    return f" --config {path}" if path else ""


# -- the checks -----------------------------------------------------------------------------------


def check_docker(config: Config, config_arg: str, pre_start: bool = False) -> Iterator[Check]:
    """With `pre_start` (the unit's ExecStartPre), an unreachable engine is a warning: the
    gateway starts without it, refuses sessions meanwhile and prepares Docker once it is back."""
    from .backends.images import engine_facts  # the docker SDK stays behind the Docker modules

    image = config.session.image
    try:
        facts = engine_facts(image)
    except BackendUnavailable as exc:
        down = warn if pre_start else fail
        consequence = "; the gateway starts and refuses sessions until it is back" if pre_start else ""
        yield down(
            "docker", f"the engine cannot be reached: {exc.detail}{consequence}",
            "start dockerd (systemctl start docker), or point DOCKER_HOST at it; the gateway runs as root "
            "or as a member of the docker group",
        )
        yield down("image", f"{image} not checked: Docker is unreachable", "fix docker first")
        return
    yield ok("docker", f"Docker {facts.version} (API {facts.api_version}) at {facts.host}")
    if config.session.backend == "swarm":
        ready, known = facts.swarm_nodes
        if not facts.swarm_manager:
            yield fail("swarm", f"session.backend = swarm, but the engine at {facts.host} is not a Swarm manager",
                       "point DOCKER_HOST at a manager (or mount a manager's socket), or `docker swarm init`")
        else:
            yield ok("swarm", f"a manager: {ready} of {known} nodes ready; every node needs the session image")
    if facts.image_id is None:
        yield fail("image", f"session image {image} is not present",
                   f"termbridge image build{config_arg} (add --base IMAGE without a registry)")
    else:
        yield ok("image", f"{image} present ({facts.image_id.removeprefix('sha256:')[:12]}, built {facts.image_created})")
    for profile in config.profiles:  # a profile with an image of its own
        own = profile.session.image
        if own != image:
            if engine_facts(own).image_id is not None:
                yield ok("image", f"profile {profile.name}: image {own} present")
            else:
                yield fail("image", f"profile {profile.name}: image {own} is not present",
                           f"build or load {own}, or change 'profiles.{profile.name}.image'")
    options = " ".join(facts.security_options)
    if "name=userns" in options or "name=rootless" in options:
        yield ok("userns-remap", "on: root in a session container is not root on the host")
    else:
        root_mode = (
            "; session.user = root: every root session shares host root's per-uid kernel limits (inotify instances...)"
            if config.session.user == "root" else ""
        )
        yield warn(
            "userns-remap", f"off: root in a session container is root on the host, should it ever escape{root_mode}",
            'set "userns-remap": "default" in /etc/docker/daemon.json and restart dockerd',
        )


def check_pam(config: Config) -> Iterator[Check]:
    service = config.auth.pam_service
    found = next((d / service for d in PAM_DIRS if (d / service).is_file()), None)
    if found is None:
        shipped = resources.etc_dir() / "pam.d" / "termbridge"
        yield fail("pam", f"PAM service {service!r} not found in {' or '.join(map(str, PAM_DIRS))}",
                   f"install -m 0644 {shipped} /etc/pam.d/{service}")
    else:
        yield ok("pam", f"service {service!r}: {found}")
    if os.geteuid() == 0 or os.access("/etc/shadow", os.R_OK):
        yield ok("shadow", "passwords can be verified (root, or /etc/shadow readable)")
    else:
        yield fail("shadow", "not root and /etc/shadow is not readable: PAM can only check this user's own password",
                   "run the gateway as root (etc/systemd/termbridge.service does)")


def _port_free(name: str, address: tuple[str, int] | None) -> Check:
    if address is None:
        return ok(name, "disabled")
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return fail(name, f"{shown}: the address does not resolve ({exc.strerror})", f"set {name} to a local address")
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return fail(name, f"{shown} is in use", f"stop what listens there (ss -ltnp 'sport = :{port}'; a running "
                            f"termbridge counts: check before starting it) or set {name} to another port")
            if exc.errno == errno.EACCES:
                return fail(name, f"{shown}: permission denied", "use a port above 1024, or run as root")
            if exc.errno == errno.EADDRNOTAVAIL:
                return fail(name, f"{shown}: no such address on this host", f"set {name} to an address of this host")
            return fail(name, f"{shown}: {exc.strerror}", f"set {name} to a free local address")
    return ok(name, f"{shown} is free")


def _probe_dir(path: Path) -> str | None:
    """None if a file can be created in `path`, else why not."""
    probe = path / f".termbridge-check-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _writable_dir(name: str, path: Path, fix: str) -> Check:
    if path.exists():
        if not path.is_dir():
            return fail(name, f"{path} exists and is not a directory", fix)
        problem = _probe_dir(path)
        return fail(name, f"{path} is not writable: {problem}", fix) if problem else ok(name, f"{path} is writable")
    parent = next(p for p in path.parents if p.exists())
    problem = _probe_dir(parent) if parent.is_dir() else "not a directory"
    if problem:
        return fail(name, f"{path} does not exist and cannot be created in {parent}: {problem}", fix)
    return ok(name, f"{path} will be created")


def _tls(config: Config) -> Check:
    web = config.web
    if web.tls_cert is None or web.tls_key is None:
        return ok("tls", "not set: plain HTTP; put a TLS proxy in front (etc/nginx/termbridge.conf)")
    missing = [str(p) for p in (web.tls_cert, web.tls_key) if not p.is_file()]
    if missing:
        verb = "does" if len(missing) == 1 else "do"
        return fail("tls", f"{' and '.join(missing)} {verb} not exist", "set web.tls_cert and web.tls_key to PEM files")
    unreadable = [str(p) for p in (web.tls_cert, web.tls_key) if not os.access(p, os.R_OK)]
    if unreadable:
        return fail("tls", f"cannot read {' and '.join(unreadable)}", "let the gateway's user read them")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(web.tls_cert, web.tls_key)
    except (OSError, ssl.SSLError) as exc:
        return fail("tls", f"{web.tls_cert} / {web.tls_key} cannot be loaded: {exc}",
                    "web.tls_cert must be a PEM certificate (chain) and web.tls_key its PEM private key")
    return ok("tls", f"{web.tls_cert} and {web.tls_key} load")


def _audit_log(path: Path) -> Check:
    fix = "create the directory or change audit.log"
    if path.exists():
        return ok("audit.log", f"{path} is appendable") if os.access(path, os.W_OK) else fail(
            "audit.log", f"{path} is not writable", fix)
    parent = _writable_dir("audit.log", path.parent, fix)
    return parent if parent.failed else ok("audit.log", f"{path} will be created")


HOME_TOOLS = ("mkfs.ext4", "e2fsck", "resize2fs", "dumpe2fs", "losetup", "mount", "umount")


def check_homes(config: Config) -> Iterator[Check]:
    """Persistent homes: the tools, their directory, and the host's mount namespace (a mount the
    gateway makes in a namespace of its own never reaches dockerd, which binds it into containers)."""
    yield _writable_dir("homes_dir", config.homes_path, "create it (0700, root's) or change homes_dir")
    missing = [tool for tool in HOME_TOOLS if shutil.which(tool) is None]
    if missing:
        yield fail("homes", f"{', '.join(missing)} not found", "install e2fsprogs, util-linux and mount")
    try:
        shared = homes.shares_docker_mount_namespace()
    except OSError as exc:
        yield warn("homes", f"cannot compare the mount namespaces of the gateway and dockerd: {exc.strerror}",
                   "run the gateway in the host's mount namespace (README, Persistent homes)")
        return
    if not shared:
        yield fail("homes", "the gateway runs in a mount namespace of its own: its home mounts would not reach Docker",
                   "use etc/systemd/persistent-homes.conf as a drop-in (README, Persistent homes)")
    elif not missing:
        yield ok("homes", f"tools present, host mount namespace; homes in {config.homes_path}")


def check_files(config: Config) -> Iterator[Check]:
    yield _writable_dir("state_dir", config.state_dir, "create it (0700, owned by the gateway's user) or change state_dir")
    yield _tls(config)
    if config.audit.log:
        yield _audit_log(Path(config.audit.log))
    if config.audit.record_dir is not None:
        yield _writable_dir("audit.record_dir", config.audit.record_dir, "create it or change audit.record_dir")
    if config.session.home == "persistent":
        yield from check_homes(config)
    xterm = resources.web_root() / "node_modules" / "@xterm" / "xterm" / "lib" / "xterm.mjs"
    if xterm.is_file():
        yield ok("assets", f"{resources.web_root()}")
    else:
        yield fail("assets", f"{xterm} is missing", "run `npm ci` in web/ (make assets), or reinstall termbridge")


def check_store(config: Config) -> Iterator[Check]:
    """The store answers, and its key file (which encrypts session keys at rest) is private."""
    from .store import SecretBox, probe

    try:
        yield ok("store.url", asyncio.run(probe(config)))
    except StoreUnavailable as exc:
        yield fail("store.url", f"the store cannot be reached: {exc.detail}",
                   "start the Redis server, or correct store.url (redis://HOST:PORT/DB; empty: SQLite on this host)")
    path = config.store_secret_file
    shared = " (every gateway sharing store.url needs the same file)" if config.store.url else ""
    if not path.exists():
        if config.store.url:
            yield warn("store.secret_file", f"{path} does not exist: created 0600 on first start{shared}",
                       "copy the file from the other gateways (mode 0600) before starting this one")
        else:
            yield ok("store.secret_file", f"{path} does not exist: created 0600 on first start")
        return
    try:
        SecretBox.from_file(path)
    except ConfigError as exc:
        yield fail("store.secret_file", exc.detail, f"chmod 600 {path}, owned by the gateway's user; or restore the file the store was written with")
        return
    yield ok("store.secret_file", f"{path} is readable, mode {stat.S_IMODE(path.stat().st_mode):04o}{shared}")


def run_checks(config_path: str | None, pre_start: bool = False) -> list[Check]:
    shown = config_path or str(DEFAULT_CONFIG_PATH)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [fail("config", f"{shown}: {exc.detail}", f"edit {shown}; etc/termbridge.toml documents every key")]
    if config_path is None and not DEFAULT_CONFIG_PATH.exists():
        checks = [warn("config", f"{shown} does not exist: built-in defaults apply",
                       f"install -m 0644 {resources.etc_dir() / 'termbridge.toml'} {shown}")]
    else:
        checks = [ok("config", f"{shown} is valid")]
    config_arg = _config_arg(config_path)
    checks += check_docker(config, config_arg, pre_start)
    checks += check_pam(config)
    checks.append(_port_free("web.listen", config.web.listen))
    checks.append(_port_free("ssh.listen", config.ssh.listen))
    checks += check_files(config)
    checks += check_store(config)
    return checks


def main(config_path: str | None, out: TextIO = sys.stdout, pre_start: bool = False) -> int:
    checks = run_checks(config_path, pre_start)
    for check in checks:
        print(check.line(), file=out)
    failed = sum(c.failed for c in checks)
    print(f"{len(checks)} checks, {failed} failed" + (", ready to serve" if not failed else ""), file=out)
    return 1 if failed else 0
