"""The Swarm backend on a real three-node Swarm (testbed/swarm.py): sessions as services, spread
over nodes, with the session's limits, labels and hardening as the node that runs them reports,
and the same isolation on every node, probed from inside containers there.

The gateway's side of the overlay is played by a probe container on the manager (the session
image with `sleep` as its main process, attached to the session overlay): it reaches each session
with a real OpenSSH client, the session's own client key and its pinned host key."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import secrets
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from bridge.backends.base import Container, ContainerSpec
from bridge.backends.engine import SESSION_CAPS
from bridge.backends.swarm import SWARM_CAPS, SwarmBackend, service_spec
from bridge.config import SessionConfig
from bridge.upstream import SessionKeys
from helpers import TEST_IMAGE
from testbed.gateway_image import ensure_gateway_image
from testbed.swarm import SwarmCluster

HOST_UID = 4242
CONFIG = dataclasses.replace(
    SessionConfig(), image=TEST_IMAGE, backend="swarm", start_timeout=90, cpus=0.25, memory=96 * 2**20, pids=128
)
PROBE = "timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo REACHED || echo BLOCKED"
# The session image keeps its accounts on tmpfs: the probe's ssh needs root's passwd entry.
PROBE_ENTRYPOINT = "mkdir -p /run/termbridge/etc && cp /etc/termbridge/base/* /run/termbridge/etc/ && exec sleep infinity"
# Capability numbers (linux/capability.h) of what a session keeps, and what only the entrypoint had.
CAP_BITS = {"CHOWN": 0, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_ADMIN": 12, "SYS_CHROOT": 18, "AUDIT_WRITE": 29}


@dataclasses.dataclass
class Started:
    """A session service this test started, with what it takes to log in to it."""

    container: Container
    keys: SessionKeys
    spec: ContainerSpec


def make_spec(user: str = "alice", root: bool = False) -> tuple[ContainerSpec, SessionKeys]:
    keys = SessionKeys.generate()
    spec = ContainerSpec(
        session_id=secrets.token_hex(16), user=user, door="ssh", started=time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        authorized_keys=keys.authorized_keys, host_private_key=keys.host_private_key,
        host_public_key=keys.host_public_key, root=root, uid=HOST_UID,
    )
    return spec, keys


# -- spec translation (no cluster) ------------------------------------------------------------


def test_service_spec_carries_limits_labels_caps_and_placement() -> None:
    config = dataclasses.replace(CONFIG, placement=("node.labels.termbridge==yes",))
    labels = {"termbridge.session": "abc", "termbridge.user": "alice"}
    spec = service_spec(config, "termbridge-abc", "tb-abc", labels, {"TERMBRIDGE_USER": "alice"}, "sec1", root=False)
    task = spec["task_template"]
    container = task["ContainerSpec"]
    assert spec["labels"] == labels and container["Labels"] == labels
    assert spec["mode"] == {"replicated": {"Replicas": 1}}
    assert task["RestartPolicy"]["Condition"] == "none"
    assert task["Resources"]["Limits"] == {"NanoCPUs": 250_000_000, "MemoryBytes": 96 * 2**20, "Pids": 128}
    assert task["Placement"]["Constraints"] == ["node.labels.termbridge==yes"]
    assert task["Placement"]["Preferences"] == [{"Spread": {"SpreadDescriptor": "node.id"}}]
    assert container["CapabilityDrop"] == ["ALL"] and container["CapabilityAdd"] == list(SWARM_CAPS)
    assert container["ReadOnly"] is True and container["Init"] is True
    assert container["Env"] and "TERMBRIDGE_NETGUARD=self" in container["Env"]
    assert [m["Target"] for m in container["Mounts"]] == ["/run", "/tmp", "/home"]
    assert container["Secrets"][0]["File"]["Name"] == "termbridge-keys"
    assert container["Secrets"][0]["File"]["Mode"] == 0o400
    assert task["Networks"] == [{"Target": config.swarm_network}]
    root = service_spec(config, "n", "h", labels, {}, "sec1", root=True)["task_template"]["ContainerSpec"]
    assert root["ReadOnly"] is False and [m["Target"] for m in root["Mounts"]] == ["/run", "/tmp"]


# -- the real cluster -------------------------------------------------------------------------


@pytest.fixture
async def swarm_backend(swarm_cluster: SwarmCluster) -> AsyncIterator[Callable[..., SwarmBackend]]:
    """SwarmBackends on the manager's API, each a gateway instance of its own; every service they
    started is stopped after the test, and the test waits until the nodes removed the containers."""
    made: list[SwarmBackend] = []

    def make(**config: Any) -> SwarmBackend:
        backend = SwarmBackend(dataclasses.replace(CONFIG, **config), f"test-{secrets.token_hex(4)}",
                               base_url=swarm_cluster.manager.url)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        for info in await backend.list_own():
            await backend.stop(info.id)
        await backend.close()
    await asyncio.to_thread(swarm_cluster.wait_gone)


@pytest.fixture
def probe(swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]) -> Iterator[Probe]:
    """The gateway's stand-in on the session overlay (created by the first backend's prepare)."""
    backend = swarm_backend()
    backend._prepare_sync()
    client = swarm_cluster.manager.client()
    container = client.containers.run(
        TEST_IMAGE, entrypoint=["sh", "-c", PROBE_ENTRYPOINT], network=CONFIG.swarm_network, detach=True,
        labels={"termbridge.testbed": "probe"}, name=f"tb-probe-{secrets.token_hex(3)}",
    )
    try:
        yield Probe(container)
    finally:
        container.remove(force=True)
        client.close()


class Probe:
    """A container on the overlay that logs in to sessions with OpenSSH, as a gateway would."""

    def __init__(self, container: Any) -> None:
        self.container = container

    def _put(self, files: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
        self.container.put_archive("/tmp", buf.getvalue())

    def exec(self, command: str) -> tuple[int, str]:
        code, out = self.container.exec_run(["sh", "-c", command])
        return code, out.decode(errors="replace")

    def ssh(self, session: Started, command: str) -> str:
        """Run `command` in the session's shell through sshd, with the session's keys."""
        tag = session.spec.session_id[:8]
        self._put({
            f"{tag}.key": session.keys.client_key.export_private_key("openssh"),
            f"{tag}.known": f"{session.container.address} ".encode() + session.keys.host_public_key,
        })
        code, out = self.exec(
            f"ssh -i /tmp/{tag}.key -o UserKnownHostsFile=/tmp/{tag}.known -o StrictHostKeyChecking=yes "
            f"-o BatchMode=yes -o ConnectTimeout=10 {session.container.ssh_user}@{session.container.address} "
            f"{_quote(command)}"
        )
        assert code == 0, f"ssh into {session.container.name} failed ({code}): {out}"
        return out


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


async def start(backend: SwarmBackend, user: str = "alice", root: bool = False) -> Started:
    spec, keys = make_spec(user, root)
    return Started(await backend.start(spec), keys, spec)


def task_node(cluster: SwarmCluster, service_id: str) -> str:
    """The hostname of the node that runs the service's task."""
    client = cluster.manager.client()
    task = client.api.tasks(filters={"service": service_id})[0]
    return client.api.inspect_node(task["NodeID"])["Description"]["Hostname"]


def node_container(cluster: SwarmCluster, service_id: str) -> Any:
    """The task's container, as Docker on the node that runs it reports it."""
    node = cluster.node(task_node(cluster, service_id))
    found = node.client().containers.list(filters={"label": f"com.docker.swarm.service.id={service_id}"})
    assert len(found) == 1, found
    return found[0]


def wait_ssh(probe: Probe, session: Started, command: str, timeout: float = 30) -> str:
    """sshd may still be starting when start() returns (the contract says so)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe.ssh(session, command)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


pytestmark_swarm = pytest.mark.swarm


@pytestmark_swarm
def test_cluster_has_a_manager_two_workers_and_the_image_everywhere(swarm_cluster: SwarmCluster) -> None:
    assert swarm_cluster.node_states() == {n.name: "ready" for n in swarm_cluster.nodes}
    roles = {n.attrs["Description"]["Hostname"]: n.attrs["Spec"]["Role"] for n in swarm_cluster.manager.client().nodes.list()}
    assert sorted(roles.values()) == ["manager", "worker", "worker"]
    image_id = swarm_cluster.host.images.get(TEST_IMAGE).id
    for node in swarm_cluster.nodes:
        assert node.client().images.get(TEST_IMAGE).id == image_id


@pytestmark_swarm
async def test_sessions_spread_over_nodes(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]
) -> None:
    backend = swarm_backend()
    sessions = await asyncio.gather(*(start(backend) for _ in range(3)))
    nodes = [task_node(swarm_cluster, s.container.id) for s in sessions]
    print("sessions on", nodes)
    assert len(set(nodes)) >= 2, nodes
    assert {s.container.id for s in sessions} == {i.id for i in await backend.list_own()}


def check_hardening(cluster: SwarmCluster, backend: SwarmBackend, probe: Probe, session: Started) -> None:
    """Limits, labels, capabilities, read-only root and tmpfs as Docker on the task's node reports
    them; no_new_privs, capabilities and swap as the kernel inside reports them."""
    kept = sum(1 << CAP_BITS[c] for c in SESSION_CAPS)
    service = cluster.manager.client().services.get(session.container.id)
    container = node_container(cluster, session.container.id)
    host = container.attrs["HostConfig"]
    wanted_labels = backend._labels(session.spec)
    assert {k: v for k, v in service.attrs["Spec"]["Labels"].items() if k.startswith("termbridge.")} == wanted_labels
    assert wanted_labels.items() <= container.labels.items()  # plus the image's own labels
    assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) == (250_000_000, 96 * 2**20, 128)
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == sorted(SWARM_CAPS)
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
    tmpfs = {m["Target"]: m for m in host["Mounts"] if m["Type"] == "tmpfs"}
    assert set(tmpfs) == {"/run", "/tmp", "/home"}
    assert tmpfs["/home"]["TmpfsOptions"]["SizeBytes"] == CONFIG.tmpfs_size
    # Docker's view: Swarm cannot ask for no-new-privileges or a swap limit.
    assert "no-new-privileges" not in (host.get("SecurityOpt") or [])
    print(f"{container.name}: Docker reports SecurityOpt={host.get('SecurityOpt')}, "
          f"MemorySwap={host['MemorySwap']} for Memory={host['Memory']}")
    out = wait_ssh(probe, session, (
        "id -u; grep -h -E '^(NoNewPrivs|CapBnd|CapEff|CapPrm)' /proc/self/status;"
        " for p in /proc/[0-9]*; do [ \"${p#/proc/}\" = 1 ] || grep -H NoNewPrivs $p/status 2>/dev/null; done;"
        " touch /etc/probe 2>&1; echo 'echo ran-from-home' > ~/t.sh && sh ~/t.sh;"
        " df -k --output=target,size /tmp /home /run | tail -n +2;"
        " cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.swap.max;"
        " grep SwapTotal /proc/meminfo"
    ))
    lines = out.splitlines()
    assert lines[0] == str(CONFIG.uid_base + HOST_UID), out
    status = dict(line.split(":\t") for line in lines[1:5])
    # The kernel's view: the shell, sshd and the holder run with no_new_privs (pid 1 is
    # docker-init, which starts the entrypoint and runs nothing after it), and neither NET_ADMIN
    # nor SETPCAP is left in any of their capability sets.
    assert status["NoNewPrivs"] == "1"
    for name in ("CapBnd", "CapEff", "CapPrm"):
        assert int(status[name], 16) & ~kept == 0, f"{name} {status[name]} has more than {SESSION_CAPS}"
    others = [line for line in lines if line.startswith("/proc/") and "NoNewPrivs" in line]
    assert len(others) >= 3 and all(line.endswith("\t1") for line in others), others
    assert "Read-only file system" in out and "ran-from-home" in out, out
    sizes = dict(line.split() for line in lines if re.match(r"^/(tmp|home|run) ", line))
    assert sizes == {"/tmp": str(CONFIG.tmpfs_size // 1024), "/home": str(CONFIG.tmpfs_size // 1024),
                     "/run": str(16 * 1024)}, out
    swap_limit, swap_total = lines[-2], lines[-1]
    print(f"{container.name}: kernel memsw limit {swap_limit}, node {swap_total}")
    # No swap for the session: either the node has none, or its cgroup limit is memory alone.
    assert swap_total.split()[1] == "0" or swap_limit in (str(96 * 2**20), "0"), (swap_limit, swap_total)


@pytestmark_swarm
async def test_same_hardening_and_isolation_on_every_node(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend], probe: Probe
) -> None:
    """One session pinned to each node. On each: the hardening (check_hardening); and from each:
    no default route, no other session's sshd (which the probe reaches), no node's API, no host
    port, nothing outside, no other session's name in DNS (which the probe, unguarded, resolves)."""
    backends = [swarm_backend(placement=(f"node.hostname=={node.name}",)) for node in swarm_cluster.nodes]
    sessions = await asyncio.gather(*(start(backend) for backend in backends))
    assert [task_node(swarm_cluster, s.container.id) for s in sessions] == [n.name for n in swarm_cluster.nodes]
    for backend, session in zip(backends, sessions):
        await asyncio.to_thread(check_hardening, swarm_cluster, backend, probe, session)
    host_ip = swarm_cluster.host_address()
    listener = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for session in sessions:
            others = [s for s in sessions if s is not session]
            targets = [(o.container.address, 22) for o in others]
            targets += [(n.address, 2375) for n in swarm_cluster.nodes]
            targets += [(host_ip, port), ("192.0.2.1", 80)]
            names = [o.container.name for o in others] + [f"tasks.{o.container.name}" for o in others]
            script = "ip route; echo --;" + "".join(
                f" echo {ip}:{p}=$({PROBE.format(ip=ip, port=p)});" for ip, p in targets
            ) + "".join(f" echo {n}=$(getent hosts {n} | wc -l);" for n in names)
            out = wait_ssh(probe, session, script)
            routes, _, results = out.partition("--\n")
            assert "default" not in routes, routes
            where = task_node(swarm_cluster, session.container.id)
            for ip, p in targets:
                assert f"{ip}:{p}=BLOCKED" in results, f"from {where}: {ip}:{p} reached\n{out}"
            for name in names:
                assert f"{name}=0" in results, f"from {where}: {name} resolved\n{out}"
        # The controls: from the probe (no guard), the same sessions' sshd and names answer.
        for session in sessions:
            _, out = probe.exec(PROBE.format(ip=session.container.address, port=22))
            assert "REACHED" in out
            _, out = probe.exec(f"getent hosts {session.container.name}")
            assert session.container.address in out
    finally:
        listener.close()
        await listener.wait_closed()


@pytestmark_swarm
async def test_a_drained_node_gets_no_new_sessions(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]
) -> None:
    drained = swarm_cluster.workers[-1]
    swarm_cluster.set_availability(drained, "drain")
    try:
        backend = swarm_backend()
        sessions = await asyncio.gather(*(start(backend) for _ in range(2)))
        nodes = [task_node(swarm_cluster, s.container.id) for s in sessions]
        assert drained.name not in nodes, nodes
    finally:
        swarm_cluster.set_availability(drained, "active")


@pytestmark_swarm
async def test_placement_constraints_that_no_node_meets_fail_cleanly(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]
) -> None:
    from bridge.errors import SessionStartError

    backend = swarm_backend(placement=("node.labels.termbridge==nowhere",), start_timeout=5)
    spec, _ = make_spec()
    with pytest.raises(SessionStartError) as caught:
        await backend.start(spec)
    assert "no server had room" in caught.value.user_message
    assert "session.placement" in caught.value.detail
    assert await backend.list_own() == []
    assert swarm_cluster.leftovers() == {}


@pytestmark_swarm
async def test_an_image_missing_on_the_chosen_node_is_named(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]
) -> None:
    """The image check can only ask the manager. A node without the image (no registry to pull
    from) rejects the task: the person is told the image is missing, the log names the node, and
    nothing is left."""
    from bridge.errors import ImageMissing

    tag = f"termbridge/session:manager-only-{secrets.token_hex(3)}"
    manager = swarm_cluster.manager.client()
    manager.images.get(TEST_IMAGE).tag(tag)
    worker = swarm_cluster.workers[0]
    try:
        backend = swarm_backend(image=tag, placement=(f"node.hostname=={worker.name}",), start_timeout=120)
        spec, _ = make_spec()
        with pytest.raises(ImageMissing) as caught:
            await backend.start(spec)
        assert "not installed" in caught.value.user_message
        assert worker.name in caught.value.detail and tag in caught.value.detail, caught.value.detail
        assert await backend.list_own() == []
        assert swarm_cluster.leftovers() == {}
    finally:
        manager.images.remove(tag, noprune=True)


@pytestmark_swarm
async def test_poll_and_stop_follow_the_task(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend], probe: Probe
) -> None:
    backend = swarm_backend()
    session = await start(backend)
    assert (await backend.poll(session.container.id)).running
    wait_ssh(probe, session, "true")
    container = node_container(swarm_cluster, session.container.id)
    container.kill()
    deadline = time.monotonic() + 30
    while (state := await backend.poll(session.container.id)).running:
        assert time.monotonic() < deadline, "poll still says running after the container was killed"
        await asyncio.sleep(0.3)
    assert state.exit_code == 137 and not state.gone
    await backend.stop(session.container.id)
    await backend.stop(session.container.id)  # idempotent
    assert (await backend.poll(session.container.id)).gone
    await asyncio.to_thread(swarm_cluster.wait_gone)
    assert swarm_cluster.leftovers() == {}


# Runs inside a gateway-image container on the session overlay (the host cannot reach it): the
# real WarmPool fills itself through the SwarmBackend, then its container is claimed over SSH.
POOL_DRIVER = r"""
import asyncio, dataclasses, json, sys
import asyncssh
from bridge.config import SessionConfig
from bridge.backends.swarm import SwarmBackend
from bridge.errors import SessionStartError
from bridge.pool import WarmPool
from bridge.upstream import Upstream


async def refused(container, keys, command):
    # sshd refuses at login, or (root with a key that has no forced command, under
    # forced-commands-only) closes the connection before any command runs.
    try:
        code, text = await Upstream.run_once(container, keys, command, 20)
    except SessionStartError as exc:
        return f"refused: {exc.detail}" if "PermissionDenied" in exc.detail else f"failed: {exc.detail}"
    except asyncssh.ChannelOpenError as exc:
        return f"refused: {exc.reason}"
    return f"ran ({code}): {text.strip()}"


async def main():
    image, instance, host_uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = dataclasses.replace(SessionConfig(), image=image, backend="swarm", pool=1, start_timeout=90)
    backend = SwarmBackend(cfg, instance)
    pool = WarmPool(1, backend, cfg, lambda: 10)
    out = {}
    try:
        pool.kick()
        for _ in range(900):
            pooled = pool.take() if pool.ready else None
            if pooled:
                break
            await asyncio.sleep(0.2)
        out["waited_for_pool"] = pooled is not None
        claim_keys = backend._claims[pooled.container.id]
        root = dataclasses.replace(pooled.container, ssh_user="root")
        out["root_before"] = await refused(root, pooled.keys, "id -u")
        container = await backend.claim(pooled.container, "carol", host_uid, False)
        code, text = await Upstream.run_once(container, pooled.keys, "id -un; id -u", 20)
        out["claimed"] = [code, text.split()]
        out["root_after"] = await refused(root, pooled.keys, "id -u")
        out["claim_again"] = await refused(root, claim_keys, "mallory 4243")
        await backend.stop(container.id)
    finally:
        await pool.close()
        await backend.close()
    print(json.dumps(out))


asyncio.run(main())
"""


@pytestmark_swarm
async def test_warm_pool_in_swarm_mode_claims_over_ssh(
    swarm_cluster: SwarmCluster, swarm_backend: Callable[..., SwarmBackend]
) -> None:
    """A pooled service has no account; the claim makes it through the forced command of a key
    only the gateway holds, and afterwards neither root nor a second claim gets in."""
    gateway_image = await asyncio.to_thread(ensure_gateway_image)
    await asyncio.to_thread(swarm_cluster.load, gateway_image, nodes=[swarm_cluster.manager])
    backend = swarm_backend()  # the driver's services carry this instance id: cleaned up after
    backend._prepare_sync()
    client = swarm_cluster.manager.client()
    driver = await asyncio.to_thread(
        client.containers.run, gateway_image, entrypoint=["/opt/termbridge/bin/python", "-c", POOL_DRIVER],
        command=[TEST_IMAGE, backend.instance_id, str(HOST_UID)], network=CONFIG.swarm_network, detach=True,
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
        labels={"termbridge.testbed": "driver"}, environment={"USER": "termbridge"},
    )
    try:
        result = await asyncio.to_thread(driver.wait, timeout=300)
        logs = driver.logs().decode(errors="replace")
    finally:
        driver.remove(force=True)
    assert result["StatusCode"] == 0, logs
    out = json.loads(logs.strip().splitlines()[-1])
    print("pool in swarm mode:", out)
    assert out["waited_for_pool"], out
    assert out["root_before"].startswith("refused"), out
    assert out["claimed"] == [0, ["carol", str(CONFIG.uid_base + HOST_UID)]], out
    assert out["root_after"].startswith("refused"), out
    assert out["claim_again"].startswith("refused"), out


@pytestmark_swarm
def test_check_reports_the_manager_and_its_nodes(swarm_cluster: SwarmCluster, tmp_path: Any, pam_service: str) -> None:
    from test_check import run_check

    from helpers import free_port, write_config

    config = write_config(tmp_path / "swarm.toml", tmp_path / "state", pam_service,
                          web={"listen": f"127.0.0.1:{free_port()}"}, ssh={"listen": f"127.0.0.1:{free_port()}"},
                          session={"backend": "swarm"})
    _, checks, output = run_check(config, DOCKER_HOST=swarm_cluster.manager.url)
    assert checks["swarm"] == ("ok", "a manager: 3 of 3 nodes ready; every node needs the session image"), output
    assert checks["image"][0] == "ok", output
