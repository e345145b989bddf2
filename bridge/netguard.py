"""Host-side network isolation of session containers: default routes and the host firewall.

Docker (20.10) leaves two holes that `session.network` promises to close. A container on an
`--internal` network still gets a default route, and a container on any bridge network reaches
every host port through its network's gateway address (the host is not "another container", so
`enable_icc=false` does not apply). This module closes both from the host side:

- `drop_default_routes(pid)` deletes the default routes inside a started container's network
  namespace (`nsenter` + `ip`); the container has no CAP_NET_ADMIN, so it cannot add them back.
- `guard_container(pid, egress)` installs a filter table inside the container's network namespace
  (which the container cannot change, lacking CAP_NET_ADMIN): Docker's embedded resolver
  127.0.0.11 is unreachable (it answers other containers' names and addresses, and forwards the
  rest out of the host), and in `internet` mode private, link-local and the host's own networks
  are rejected unless allowed, with the configured resolvers reachable on port 53 only.
- `guard_bridge(bridge)` installs iptables rules, idempotently: new connections entering the host
  from the session bridge are rejected (replies to the gateway's own SSH connections into the
  containers are ESTABLISHED and pass), and bridge-to-bridge forwarding (container to container)
  is dropped even if the network was created with inter-container traffic on.

Everything here blocks (subprocesses): callers run it in a thread. The rules are shared by every
gateway on the host and never removed by one of them; `iptables -S TERMBRIDGE-HOST` shows them.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BridgeError

log = logging.getLogger("termbridge.netguard")

HOST_CHAIN = "TERMBRIDGE-HOST"
HOST_CHAIN_RULES = (
    ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"),
    ("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"),
    ("-j", "REJECT", "--reject-with", "icmp-port-unreachable"),
)
# Under systemd, RuntimeDirectory=termbridge makes /run/termbridge writable (ProtectSystem=strict).
LOCK_PATH = Path("/run/termbridge/netguard.lock")
BRIDGE_NF_SYSCTL = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
TIMEOUT = 20
# Docker's embedded DNS server, inside every container on a user-defined network.
EMBEDDED_DNS = "127.0.0.11"
# Where nothing on the internet lives, but cloud metadata (169.254.169.254), the server's LAN and
# other internal services do: closed to `internet` sessions unless session.internet_allow opens it.
PRIVATE_NETWORKS = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10",
)
RESOLV_CONFS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


class NetworkGuardError(BridgeError):
    user_message = "the session network could not be secured; ask the admin to check the gateway's log"


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, input=input)
    except FileNotFoundError:
        raise NetworkGuardError(detail=f"{cmd[0]} is not installed (needed for session.network)") from None
    except subprocess.TimeoutExpired:
        raise NetworkGuardError(detail=f"{' '.join(cmd)} did not finish in {TIMEOUT} s") from None
    if check and done.returncode != 0:
        raise NetworkGuardError(detail=f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise NetworkGuardError(detail=f"{', '.join(missing)} not found on PATH (needed for session.network)")


# -- routes ---------------------------------------------------------------------------------------


def _in_netns(pid: int, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return _run("nsenter", f"--target={pid}", "--net", "--", *cmd, check=check, input=input)


def default_routes(pid: int) -> list[str]:
    """The default routes (IPv4 and IPv6) in the network namespace of process `pid`."""
    routes = []
    for family in ("-4", "-6"):
        out = _in_netns(pid, "ip", family, "route", "show", "default").stdout
        routes.extend(f"{family} {line.strip()}" for line in out.splitlines() if line.strip())
    return routes


def drop_default_routes(pid: int) -> None:
    """Delete every default route of the container whose init process is `pid`, then check."""
    if pid <= 0:
        raise NetworkGuardError(detail="the container is not running (no pid)")
    for route in default_routes(pid):
        family, *spec = route.split()
        _in_netns(pid, "ip", family, "route", "del", *spec)
    left = default_routes(pid)
    if left:
        raise NetworkGuardError(detail=f"default route survived deletion: {left}")


# -- inside the container ------------------------------------------------------------------------


@dataclass(frozen=True)
class Egress:
    """Where a session container may send new traffic. `blocked` empty: only the embedded
    resolver is closed (isolated mode, where there is no route anyway)."""

    blocked: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    resolvers: tuple[str, ...] = ()


def host_networks() -> list[str]:
    """The networks of this host's own addresses (loopback aside), e.g. the server's LAN."""
    found = []
    for family in ("-4", "-6"):
        for line in _run("ip", family, "-o", "addr", "show").stdout.splitlines():
            fields = line.split()
            if "inet" not in fields[2]:
                continue
            network = ipaddress.ip_interface(fields[3]).network
            if not network.is_loopback and str(network) not in found:
                found.append(str(network))
    return found


def upstream_resolvers(candidates: tuple[Path, ...] = RESOLV_CONFS) -> tuple[str, ...]:
    """The host's name servers that a container can reach: not loopback (systemd-resolved's
    127.0.0.53 lists its real upstreams in /run/systemd/resolve/resolv.conf)."""
    for path in candidates:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        servers = []
        for line in lines:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(fields[1].split("%")[0])
                except ValueError:
                    continue
                if not address.is_loopback:
                    servers.append(str(address))
        if servers:
            return tuple(servers[:3])
    return ()


def _filter_table(egress: Egress, version: int) -> str:
    def mine(networks: tuple[str, ...]) -> list[str]:
        return [n for n in networks if ipaddress.ip_network(n, strict=False).version == version]

    rules = [f"-A OUTPUT -d {EMBEDDED_DNS}/32 -j REJECT"] if version == 4 else []
    rules.append("-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    for server in mine(egress.resolvers):
        rules += [f"-A OUTPUT -d {server} -p {proto} --dport 53 -j ACCEPT" for proto in ("udp", "tcp")]
    rules += [f"-A OUTPUT -d {network} -j ACCEPT" for network in mine(egress.allowed)]
    rules += [f"-A OUTPUT -d {network} -j REJECT" for network in mine(egress.blocked)]
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])


def guard_container(pid: int, egress: Egress) -> None:
    """Install the container's own filter table, IPv4 and IPv6 (each restore is all or nothing,
    and a failure raises)."""
    if pid <= 0:
        raise NetworkGuardError(detail="the container is not running (no pid)")
    for version, restore in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        _in_netns(pid, restore, input=_filter_table(egress, version))


def resolv_conf(egress: Egress) -> str:
    """The container's /etc/resolv.conf: the upstream resolvers, or none at all."""
    if not egress.resolvers:
        return "# no name service in this session (session.network = isolated, or no resolver found)\n"
    return "".join(f"nameserver {server}\n" for server in egress.resolvers)


# -- firewall -------------------------------------------------------------------------------------


@contextmanager
def _host_lock() -> Iterator[None]:
    """Serialises check-then-insert across gateways on this host (iptables -w only locks one call)."""
    LOCK_PATH.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("iptables", "-w", "10", *args, check=check)


def _has_rule(chain: str, rule: tuple[str, ...]) -> bool:
    return _iptables("-C", chain, *rule, check=False).returncode == 0


def _chain_exists(chain: str) -> bool:
    return _iptables("-S", chain, check=False).returncode == 0


def _ensure_host_chain() -> None:
    if not _chain_exists(HOST_CHAIN):
        _iptables("-N", HOST_CHAIN)
    current = [line for line in _iptables("-S", HOST_CHAIN).stdout.splitlines() if line.startswith("-A ")]
    expected = [" ".join(("-A", HOST_CHAIN, *rule)) for rule in HOST_CHAIN_RULES]
    if current != expected:
        _iptables("-F", HOST_CHAIN)
        for rule in HOST_CHAIN_RULES:
            _iptables("-A", HOST_CHAIN, *rule)


def _host_rule(bridge: str) -> tuple[str, ...]:
    return ("-i", bridge, "-j", HOST_CHAIN)


def _forward_rule(bridge: str) -> tuple[str, ...]:
    return ("-i", bridge, "-o", bridge, "-j", "DROP")


def _forward_chain() -> str:
    """Docker's documented place for our own forwarding rules; FORWARD when Docker made none."""
    return "DOCKER-USER" if _chain_exists("DOCKER-USER") else "FORWARD"


def _check_bridge_netfilter() -> None:
    try:
        value = BRIDGE_NF_SYSCTL.read_text().strip()
    except OSError:
        value = "missing"
    if value != "1":
        raise NetworkGuardError(
            detail=f"{BRIDGE_NF_SYSCTL} is {value}: traffic between containers on one bridge bypasses iptables "
            "(modprobe br_netfilter; sysctl net.bridge.bridge-nf-call-iptables=1)"
        )


def guard_bridge(bridge: str) -> None:
    """Install (or repair) the rules for session bridge `bridge`. Idempotent and safe to run from
    several gateways at once."""
    if not bridge or not all(c.isalnum() or c in "-_." for c in bridge):
        raise NetworkGuardError(detail=f"refusing odd bridge name {bridge!r}")
    _check_bridge_netfilter()
    with _host_lock():
        _ensure_host_chain()
        if not _has_rule("INPUT", _host_rule(bridge)):
            _iptables("-I", "INPUT", "1", *_host_rule(bridge))
            log.info("firewall: new connections from %s to this host are rejected", bridge)
        chain = _forward_chain()
        if not _has_rule(chain, _forward_rule(bridge)):
            _iptables("-I", chain, "1", *_forward_rule(bridge))
            log.info("firewall: traffic between containers on %s is dropped (%s)", bridge, chain)


def bridge_guarded(bridge: str) -> bool:
    """Cheap check that the rules are still in place (someone may have flushed the firewall)."""
    return _has_rule("INPUT", _host_rule(bridge)) and _has_rule(_forward_chain(), _forward_rule(bridge))
