"""session.network with real connections: containers this test starts, and a listener this test
opens on the host (0.0.0.0, random port). No other address is ever contacted."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import pytest

from bridge import netguard
from bridge.backends.docker import NETWORK_NAMES, DockerBackend
from bridge.config import SessionConfig
from helpers import PROMPT, ROOT, TEST_IMAGE, session_containers, write_config
from privatenet import ANSWER, PORT, PrivateNet

PROBE = "timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo REACHED-{tag} || echo BLOCKED-{tag}"


class HostListener:
    """A TCP listener on 0.0.0.0 that remembers who connected."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> HostListener:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[0])
            writer.close()

        self.server = await asyncio.start_server(accepted, "0.0.0.0", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def network_gateway(name: str) -> str:
    """The host's address on a Docker network (its gateway address)."""
    client = docker.from_env()
    try:
        attrs = client.networks.get(name).attrs
    finally:
        client.close()
    config = (attrs["IPAM"]["Config"] or [{}])[0]
    if config.get("Gateway"):
        return config["Gateway"]
    bridge = attrs["Options"].get("com.docker.network.bridge.name") or f"br-{attrs['Id'][:12]}"
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True, check=True)
    return out.stdout.split()[3].split("/")[0]


async def session_shell(gateway, http):
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    [container] = session_containers(**{"termbridge.session": session["id"]})
    address = container.attrs["NetworkSettings"]["Networks"][NETWORK_NAMES[gateway.config.session.network]]["IPAddress"]
    return term, address


async def probe(term, ip: str, port: int) -> str:
    tag = secrets.token_hex(3)
    out = await term.run(PROBE.format(ip=ip, port=port, tag=tag), timeout=20)
    return out.strip().replace(f"-{tag}", "")


async def reachable_from_host(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
    except OSError:
        return False
    writer.close()
    return True


def control_probe(docker_engine, port: int) -> tuple[str, str]:
    """The same probe from a container on a network this test creates (not a session network):
    shows that the listener is reachable from containers at all, so BLOCKED above means blocked."""
    network = docker_engine.networks.create(f"tbtest-{secrets.token_hex(4)}", driver="bridge", labels={"tbtest": "1"})
    try:
        network.reload()
        gw = network.attrs["IPAM"]["Config"][0]["Gateway"]
        out = docker_engine.containers.run(
            TEST_IMAGE, entrypoint=["bash", "-c", PROBE.format(ip=gw, port=port, tag="x")],
            network=network.name, remove=True, labels={"tbtest": "1"},
        )
        return gw, out.decode().strip()
    finally:
        network.remove()


async def check_isolation(gateway, user, make_user, docker_engine, *, default_route: bool) -> None:
    other = make_user()
    mode = gateway.config.session.network
    gw_addr = network_gateway(NETWORK_NAMES[mode])
    async with HostListener() as listener, await gateway.login(user) as http_a, await gateway.login(other) as http_b:
        term_a, addr_a = await session_shell(gateway, http_a)
        term_b, addr_b = await session_shell(gateway, http_b)

        routes = await term_a.run("ip -4 route; ip -6 route")
        if default_route:
            assert f"default via {gw_addr}" in routes, routes
        else:
            assert "default" not in routes, routes
        assert (await term_a.run("ip -6 -o addr | grep -v ' lo ' | wc -l")).strip() == "0"  # no IPv6 way out

        # the host, through the network's gateway address and through docker0's
        assert await reachable_from_host(gw_addr, listener.port)  # the listener is up on that address
        heard = len(listener.peers)
        assert await probe(term_a, gw_addr, listener.port) == "BLOCKED"
        docker0 = network_gateway("bridge")
        assert await probe(term_a, docker0, listener.port) == "BLOCKED"
        assert listener.peers[heard:] == []

        # another session's container: its sshd listens (the gateway reaches it), A does not
        assert await reachable_from_host(addr_b, 22)
        assert await probe(term_a, addr_b, 22) == "BLOCKED"
        assert await probe(term_b, addr_a, 22) == "BLOCKED"

        control_gw, out = await asyncio.to_thread(control_probe, docker_engine, listener.port)
        assert out == "REACHED-x", out
        assert len(listener.peers) == heard + 1, listener.peers
        for term in (term_a, term_b):
            await term.send("exit\r")
            await term.control("exit")


async def test_isolated_network(gateway, user, make_user, docker_engine):
    assert gateway.config.session.network == "isolated"
    await check_isolation(gateway, user, make_user, docker_engine, default_route=False)
    assert docker_engine.networks.get("termbridge-isolated").attrs["Internal"] is True


async def test_internet_network_keeps_the_host_and_other_sessions_out(start_gateway, user, make_user, docker_engine):
    gateway = await start_gateway(session={"network": "internet"})
    await check_isolation(gateway, user, make_user, docker_engine, default_route=True)
    attrs = docker_engine.networks.get("termbridge-internet").attrs
    assert attrs["Internal"] is False  # outbound goes through Docker's masquerading
    assert attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"


async def dns_leaks(term, other_user: str, other_address: str, network: str) -> str:
    """What session `term` learns by name service about another session's container, this host
    and the Docker network: reverse and forward lookups, each bounded in time."""
    [other] = session_containers(**{"termbridge.user": other_user})
    names = [other.name, f"{other.name}.{network}", other.id[:12], other.attrs["Config"]["Hostname"],
             socket.gethostname(), network, "host.docker.internal", "gateway"]
    lookups = [f"getent hosts {other_address}"] + [f"getent ahostsv4 {name}" for name in names]
    return await term.run("; ".join(f"timeout 10 {lookup}" for lookup in lookups), timeout=120)


async def test_sessions_learn_nothing_about_each_other_by_dns(gateway, user, make_user, docker_engine):
    """Docker's embedded resolver (127.0.0.11) answered a reverse lookup of another session's
    address with `termbridge-<their login>-<id>.termbridge-isolated`. Nothing answers now."""
    other = make_user()
    network = NETWORK_NAMES["isolated"]
    async with await gateway.login(user) as http_a, await gateway.login(other) as http_b:
        term_a, _ = await session_shell(gateway, http_a)
        term_b, addr_b = await session_shell(gateway, http_b)
        assert await dns_leaks(term_a, other.name, addr_b, network) == ""
        # control: a container of this test on the same network, without the session's filter
        # rules, gets the answer from Docker's resolver, so "nothing" above means shut
        out = await asyncio.to_thread(
            docker_engine.containers.run, TEST_IMAGE, entrypoint=["getent", "hosts", addr_b],
            network=network, remove=True, labels={"tbtest": "1"},
        )
        assert out.decode().split()[:1] == [addr_b], out
        # Docker's DNS and `docker ps` show container names: never the login
        assert not [c.name for c in session_containers() if other.name in c.name or user.name in c.name]
        for term in (term_a, term_b):
            await term.send("exit\r")
            await term.control("exit")


async def test_internet_mode_keeps_private_networks_out_unless_allowed(start_gateway, user, make_user, tmp_path):
    """A private network made on this machine (network namespace, 10.213.x.2) stands in for the
    server's LAN, cloud metadata and an internal name server: a session in internet mode cannot
    connect to it, can use it as its configured name server (port 53), learns nothing about other
    sessions by DNS, and with session.internet_allow it connects."""
    other = make_user()
    with PrivateNet(tmp_path) as net:
        gateway = await start_gateway(session={"network": "internet", "dns": [net.address]})
        async with await gateway.login(user) as http_a, await gateway.login(other) as http_b:
            term_a, _ = await session_shell(gateway, http_a)
            term_b, addr_b = await session_shell(gateway, http_b)
            assert (await term_a.run("grep nameserver /etc/resolv.conf")).split() == ["nameserver", net.address]
            resolved = await term_a.run("timeout 10 getent ahostsv4 probe.tbtest | head -1")
            assert resolved.split()[:1] == [ANSWER], resolved
            assert await dns_leaks(term_a, other.name, addr_b, NETWORK_NAMES["internet"]) == ""
            assert await probe(term_a, net.address, PORT) == "BLOCKED"
            assert net.connections() == []
            for term in (term_a, term_b):
                await term.send("exit\r")
                await term.control("exit")

        allowing = await start_gateway(session={"network": "internet", "dns": [net.address],
                                                "internet_allow": [net.network]})
        async with await allowing.login(user) as http:
            term, _ = await session_shell(allowing, http)
            assert await probe(term, net.address, PORT) == "REACHED"
            assert len(net.connections()) == 1
            await term.send("exit\r")
            await term.control("exit")


def test_guard_is_idempotent_under_concurrency():
    """Several gateways installing the rules at once leave exactly one copy. Uses a bridge name
    that no interface has, and removes its rules afterwards."""
    bridge = f"tbtest{secrets.token_hex(3)}"
    try:
        threads = [threading.Thread(target=netguard.guard_bridge, args=(bridge,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        netguard.guard_bridge(bridge)
        assert netguard.bridge_guarded(bridge)
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
        assert rules.count(f"-A INPUT -i {bridge} -j {netguard.HOST_CHAIN}") == 1
        assert rules.count(f"-i {bridge} -o {bridge} -j DROP") == 1
    finally:
        subprocess.run(["iptables", "-w", "-D", "INPUT", "-i", bridge, "-j", netguard.HOST_CHAIN], capture_output=True)
        chain = "DOCKER-USER" if netguard._chain_exists("DOCKER-USER") else "FORWARD"
        subprocess.run(["iptables", "-w", "-D", chain, "-i", bridge, "-o", bridge, "-j", "DROP"], capture_output=True)
    assert not netguard.bridge_guarded(bridge)


def test_starts_asking_at_once_share_one_firewall_check(monkeypatch):
    """Eight starts asking at once are answered by one or two real checks of the host's rules,
    not eight in a row; a start asking after a check has passed gets a check of its own."""
    backend = DockerBackend(SessionConfig(image=TEST_IMAGE), f"test-net-{os.getpid()}")
    try:
        backend._prepare_sync()  # the network and the rules, as at the gateway's start
        checks: list[str] = []
        real = netguard.bridge_guarded

        def counted(bridge: str) -> bool:
            checks.append(bridge)
            time.sleep(0.2)  # a slow check, so that the eight overlap
            return real(bridge)

        monkeypatch.setattr(netguard, "bridge_guarded", counted)
        threads = [threading.Thread(target=backend._prepare_sync) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= len(checks) <= 2, checks
        backend._prepare_sync()
        backend._prepare_sync()
        assert len(checks) in (3, 4), checks  # one more each, one after the other
    finally:
        backend._forget_client()


def test_odd_bridge_names_are_refused():
    with pytest.raises(netguard.NetworkGuardError):
        netguard.guard_bridge("br0 -j ACCEPT")


def _tools_dir(tmp_path: Path, names: list[str]) -> str:
    """A PATH with only these tools (and a shell)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names + ["sh"]:
        found = subprocess.run(["sh", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
        os.symlink(found, bin_dir / name)
    return str(bin_dir)


async def test_gateway_refuses_to_start_without_its_firewall(tmp_path, pam_service, state_dir):
    path = write_config(tmp_path / "gw.toml", state_dir(), pam_service, web={"listen": "127.0.0.1:0"})
    env = {**os.environ, "PATH": _tools_dir(tmp_path, ["nsenter", "ip"])}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "serve", "--config", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "could not be secured" in done.stderr and "iptables, iptables-restore, ip6tables-restore not found" in done.stderr, done.stderr


async def test_firewall_off_is_a_loud_choice(gateway_process, tmp_path):
    process = gateway_process(session={"firewall": False})
    await process.start(env={**os.environ, "PATH": _tools_dir(tmp_path, ["nsenter", "ip"])})
    process.signal(signal.SIGTERM)
    await process.wait(30)
    err = process.log()
    assert "session.firewall is off" in err, err


def test_upstream_resolvers_skip_loopback(tmp_path):
    """systemd-resolved's stub (127.0.0.53) is useless to a container: its real upstreams are used."""
    stub, real = tmp_path / "resolv.conf", tmp_path / "resolved.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\n")
    real.write_text("# upstream\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver junk\nsearch lan\n")
    assert netguard.upstream_resolvers((stub, real)) == ("10.0.0.2", "fe80::1")
    assert netguard.upstream_resolvers((stub,)) == ()
    assert netguard.resolv_conf(netguard.Egress()).startswith("# no name service")


def test_host_networks_include_this_hosts_own_addresses():
    nets = netguard.host_networks()
    docker0 = network_gateway("bridge")
    assert any(ipaddress.ip_address(docker0) in ipaddress.ip_network(n) for n in nets), nets
    assert not any(ipaddress.ip_network(n).is_loopback for n in nets)
