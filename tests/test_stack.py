"""The shipped Swarm stack (etc/swarm/termbridge.yml) on the test cluster (testbed/swarm.py), with
real gateway containers built from etc/gateway/Dockerfile, the Redis and nginx services, real PAM
accounts (made on the host after the stack is up: the gateways read the host's account files
live) and real WebSocket clients reaching the gateways only through the front's port on the
manager's address. Faults: a gateway replica killed, a worker node gone, the managers' quorum
lost; every session's service and container is gone afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import docker.errors
import pytest

from bridge.fleet import HOST_INTERVAL, HOST_LOST
from helpers import PROMPT, TEST_IMAGE, Gateway, Terminal, wait_for
from testbed.accounts import HostUser
from testbed.stack import Stack
from testbed.swarm import Node, SwarmCluster

pytestmark = pytest.mark.swarm

SESSION_LABEL = "termbridge.session"


def stack_config(path: Path, **session: Any) -> Path:
    """The shipped etc/swarm/termbridge.toml with the image under test (and `session` keys)."""
    text = (Path(__file__).resolve().parent.parent / "etc" / "swarm" / "termbridge.toml").read_text()
    text = text.replace('image = "termbridge/session:latest"', f'image = "{TEST_IMAGE}"')
    text = text.replace('placement = ["node.labels.termbridge==yes"]\n', "")
    extra = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in session.items())
    path.write_text(text.replace("[session]\n", "[session]\n" + extra))
    return path


@pytest.fixture(scope="module")
def stack(swarm_cluster: SwarmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two gateway replicas, Redis and the front, deployed as an admin does; removed after, and
    then no session service, secret or container is left on any node."""
    config = stack_config(tmp_path_factory.mktemp("stack") / "termbridge.toml", start_timeout="60s")
    began = time.monotonic()
    deployed = Stack(swarm_cluster, f"tbstack{int(time.time()) % 100000}", config, replicas=2)
    try:
        deployed.deploy()
        swarm_cluster.deploy_seconds = time.monotonic() - began  # type: ignore[attr-defined]
        yield deployed
    finally:
        deployed.remove()
    assert not swarm_cluster.leftovers(), swarm_cluster.leftovers()


@pytest.fixture
def front(stack: Stack) -> Gateway:
    return Gateway(url=stack.web_url, config=None, app=None)  # type: ignore[arg-type]


@pytest.fixture
async def http_sessions() -> AsyncIterator[list[aiohttp.ClientSession]]:
    made: list[aiohttp.ClientSession] = []
    yield made
    for http in made:
        await http.close()


async def open_terminal(front: Gateway, http: aiohttp.ClientSession) -> tuple[Terminal, str]:
    term = await front.terminal(http)
    session = await term.control("session", timeout=90)
    await term.expect(PROMPT, timeout=60)
    return term, session["id"]


def instance_id(gateway: Any) -> str:
    """A gateway container's instance id, from its own state_dir (the stack sets it per slot)."""
    code, out = gateway.exec_run(["sh", "-c", 'cat "$TERMBRIDGE_STATE_DIR/instance-id"'])
    assert code == 0, out
    return out.decode().strip()


def session_services(stack: Stack) -> dict[str, dict[str, Any]]:
    """Session id → its service's labels and the node its task runs on (hostname)."""
    api = stack.manager.client().api
    hostnames = {n["ID"]: n["Description"]["Hostname"] for n in api.nodes()}
    found = {}
    for service in api.services(filters={"label": SESSION_LABEL}):
        labels = service["Spec"]["Labels"]
        try:
            tasks = api.tasks(filters={"service": service["ID"], "desired-state": "running"})
        except docker.errors.NotFound:  # removed since the list: gone
            continue
        node = hostnames.get(tasks[0].get("NodeID", ""), "") if tasks else ""
        found[labels[SESSION_LABEL]] = {"labels": labels, "node": node, "service": service["ID"]}
    return found


async def test_logins_reach_every_replica_through_the_front_with_live_host_accounts(
    stack: Stack, front: Gateway, make_user: Callable[..., HostUser]
) -> None:
    user = make_user()  # made after the stack started
    assert await front.attempt_login(user.name, user.password + "x") == 401
    http = await front.login(user)
    await http.close()
    # Every replica has its own state_dir, so its own instance id.
    ids = {instance_id(container) for container in stack.gateway_containers()}
    assert len(ids) == stack.replicas == 2


async def test_sessions_spread_over_nodes_and_survive_their_gateway_replica_being_killed(
    stack: Stack, front: Gateway, make_user: Callable[..., HostUser], http_sessions: list[aiohttp.ClientSession]
) -> None:
    user = make_user()
    http = await front.login(user)
    http_sessions.append(http)
    terms = []
    for _ in range(3):
        terms.append(await open_terminal(front, http))
    services = session_services(stack)
    assert {sid for _, sid in terms} <= set(services)
    nodes = {services[sid]["node"] for _, sid in terms}
    assert len(nodes) >= 2, f"sessions all on {nodes}"

    term, sid = terms[0]
    await term.send("echo before-$((6*7))\r")
    await term.expect(b"before-42")
    await term.expect(PROMPT)
    serving = services[sid]["labels"]["termbridge.gateway"]
    victim = next(c for c in stack.gateway_containers() if instance_id(c) == serving)
    offset = term.received
    victim.kill()  # SIGKILL: no goodbye, no store update from that replica
    await term.drain_until_closed(timeout=30)

    began = time.monotonic()
    resumed = None
    while resumed is None and time.monotonic() - began < 60:
        try:
            ws = await http.ws_connect(f"/ws?session={sid}&offset={offset}", headers={"Origin": front.origin}, max_msg_size=0)
        except aiohttp.ClientError:
            await asyncio.sleep(0.3)
            continue
        candidate = Terminal(ws)
        try:
            message = await candidate.control("session", timeout=30)
        except AssertionError:
            await asyncio.sleep(0.3)
            continue
        resumed = candidate
        assert message["id"] == sid and message["offset"] == offset
    assert resumed is not None, "the session did not come back through another replica"
    await resumed.send("echo after-$((6*7))\r")
    await resumed.expect(b"after-42")
    assert [c for c in resumed.controls if c.get("type") in ("exit", "gap")] == []
    for t, s in [(resumed, sid), *terms[1:]]:  # the others may have been on the killed replica too
        await end_session(front, http, t, s)
    await wait_for(lambda: not set(session_services(stack)) & {s for _, s in terms}, timeout=60,
                   what="the session services to go")


async def test_a_worker_gone_mid_session_ends_its_sessions_with_error_and_leaves_nothing(
    stack: Stack, swarm_cluster: SwarmCluster, front: Gateway, make_user: Callable[..., HostUser],
    http_sessions: list[aiohttp.ClientSession],
) -> None:
    user = make_user()
    http = await front.login(user)
    http_sessions.append(http)
    opened = []
    worker: Node | None = None
    for _ in range(6):
        term, sid = await open_terminal(front, http)
        opened.append((term, sid))
        node = session_services(stack)[sid]["node"]
        if node != swarm_cluster.manager.name:
            worker = swarm_cluster.node(node)
            break
    assert worker is not None, "no session landed on a worker"
    on_worker = [(t, s) for t, s in opened if session_services(stack)[s]["node"] == worker.name]
    elsewhere = [(t, s) for t, s in opened if (t, s) not in on_worker]
    began = time.monotonic()
    swarm_cluster.host.containers.get(worker.name).pause()  # the node dies: no heartbeat, no FIN
    try:
        for term, _ in on_worker:
            try:
                end = await term.control("exit", timeout=90)
            except (AssertionError, TimeoutError):
                raise AssertionError(f"no end; gateways said:\n{stack.logs()[-4000:]}") from None
            assert end["reason"] == "error" and end["message"] == HOST_LOST, end
        ended_after = time.monotonic() - began
        await wait_for(lambda: not set(session_services(stack)) & {s for _, s in on_worker}, timeout=60,
                       what="the lost sessions' services to be removed")
        for term, _ in elsewhere:  # sessions elsewhere go on
            await term.send("echo still-$((6*7))\r")
            await term.expect(b"still-42")
    finally:
        swarm_cluster.host.containers.get(worker.name).unpause()
    await wait_for(lambda: swarm_cluster.node_states().get(worker.name) == "ready", timeout=90, what="the worker back")
    # The node's agent removes the container of a service that no longer exists.
    await wait_for(lambda: not worker.client().containers.list(all=True, filters={"label": SESSION_LABEL}),
                   timeout=90, what="the worker's session containers to go")
    for term, session_id in elsewhere:
        await end_session(front, http, term, session_id)
    print(f"sessions on the lost worker ended {ended_after:.1f} s after it went away")


async def test_without_quorum_new_sessions_get_a_clear_error_and_running_ones_go_on(
    stack: Stack, swarm_cluster: SwarmCluster, front: Gateway, make_user: Callable[..., HostUser],
    http_sessions: list[aiohttp.ClientSession],
) -> None:
    """Both workers promoted (three managers), then two of them paused: the remaining manager
    (where the gateways run) has no quorum until they come back."""
    user = make_user()
    http = await front.login(user)
    http_sessions.append(http)
    # The session on the manager (the paused nodes' sessions would freeze with them): the workers
    # take no new task meanwhile.
    for node in swarm_cluster.workers:
        swarm_cluster.set_availability(node, "pause")
    try:
        running, sid = await open_terminal(front, http)
    finally:
        for node in swarm_cluster.workers:
            swarm_cluster.set_availability(node, "active")
    assert session_services(stack)[sid]["node"] == swarm_cluster.manager.name
    api = swarm_cluster.manager.client().api
    promoted = swarm_cluster.workers
    paused: list[Node] = []
    try:
        for node in promoted:
            swarm_cluster.set_role(node, "manager")
        await wait_for(lambda: _reachable_managers(api) == 3, timeout=60, what="three reachable managers")
        for node in promoted:
            swarm_cluster.host.containers.get(node.name).pause()
            paused.append(node)
        await wait_for(lambda: not _can_write(api), timeout=90, interval=1, what="quorum lost")
        refused = await front.terminal(http)
        error = await refused.control("exit", timeout=150)
        assert error["reason"] == "error" and "try again" in (error.get("message") or ""), (
            error, stack.logs()[-3000:])
        running = await still_running(front, http, running, sid, "alive")
    finally:
        # A new leader marks the nodes "unknown" until they report in: the gateways' host watch
        # must not take that for hosts gone (it runs every HOST_INTERVAL; the test waits through it).
        states: list[set[str]] = []
        watching = asyncio.create_task(_watch_node_states(api, states))
        try:
            for node in paused:
                swarm_cluster.host.containers.get(node.name).unpause()
            await wait_for(lambda: _can_write(api), timeout=150, interval=1, what="quorum back")
            for node in promoted:
                swarm_cluster.set_role(node, "worker")
            await asyncio.sleep(3 * HOST_INTERVAL)
        finally:
            watching.cancel()
        print("node states seen as the quorum came back:", states)
    try:
        running = await still_running(front, http, running, sid, "back")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ngateways said:\n{stack.logs()[-6000:]}") from None
    again, again_id = await open_terminal(front, http)
    for term, session_id in ((running, sid), (again, again_id)):
        await end_session(front, http, term, session_id)


async def still_running(front: Gateway, http: aiohttp.ClientSession, term: Terminal, sid: str, word: str) -> Terminal:
    """The session's shell answers, through `term` or, if its socket dropped (its gateway went
    away), through a new one to the same session, as the page reconnects."""
    if not term.closed:
        try:
            await term.send(f"echo {word}-$((6*7))\r")
            await term.expect(f"{word}-42".encode(), timeout=30)
            return term
        except (ConnectionError, AssertionError) as exc:
            print(f"{word}: the socket to {sid[:8]} broke ({exc!r:.200}); reattaching")
    else:
        print(f"{word}: the socket to {sid[:8]} was closed ({term.controls[-3:]}); reattaching")
    again = await reattach(front, http, sid, term.received)
    await again.send(f"echo {word}-$((6*7))\r")
    await again.expect(f"{word}-42".encode(), timeout=30)
    return again


async def end_session(front: Gateway, http: aiohttp.ClientSession, term: Terminal, sid: str) -> None:
    """`exit` in the session's shell, through its socket or, if that dropped (its gateway was
    killed or replaced), reattached to the session as the page does."""
    if term.closed:
        term = await reattach(front, http, sid, term.received)
    try:
        await term.send("exit\r")
    except ConnectionError:
        term = await reattach(front, http, sid, term.received)
        await term.send("exit\r")
    await term.control("exit", timeout=30)


async def reattach(front: Gateway, http: aiohttp.ClientSession, sid: str, offset: int) -> Terminal:
    ws = await http.ws_connect(f"/ws?session={sid}&offset={offset}", headers={"Origin": front.origin}, max_msg_size=0)
    term = Terminal(ws)
    assert (await term.control("session", timeout=60))["id"] == sid, term.controls
    return term


async def _watch_node_states(api: Any, seen: list[set[str]]) -> None:
    """Every distinct set of node states the manager reports, until cancelled."""
    while True:
        try:
            states = await asyncio.to_thread(lambda: {(n.get("Status") or {}).get("State", "?") for n in api.nodes()})
        except Exception:  # noqa: BLE001 (no leader yet)
            states = {"no answer"}
        if not seen or seen[-1] != states:
            seen.append(states)
        await asyncio.sleep(0.2)


def _reachable_managers(api: Any) -> int:
    return sum(1 for n in api.nodes() if (n.get("ManagerStatus") or {}).get("Reachability") == "reachable")


def _can_write(api: Any) -> bool:
    """A manager without quorum may still answer reads from its own copy; a write needs a
    majority of managers."""
    try:
        probe = api.create_secret(f"tb-quorum-probe-{time.monotonic_ns()}", b"x", labels={"termbridge.testbed": "probe"})
    except Exception:  # noqa: BLE001 (no quorum: an error or a time-out, whichever the manager gives)
        return False
    api.remove_secret(probe["ID"])
    return True
