"""How the Swarm backend names a cluster that cannot act, at its seam (the SDK call it makes):
managers without a leader answer 503, and a change they cannot commit times out. Both are
SwarmUnavailable, whose message tells the person to try again; anything else is not. The same
behaviour on the real cluster: tests/test_stack.py (quorum lost)."""

from __future__ import annotations

import docker.errors
import pytest
import requests

from bridge.backends.swarm import SwarmBackend, SwarmUnavailable
from bridge.config import SessionConfig
from bridge.errors import BackendUnavailable


def _raise(exc: Exception) -> None:
    raise exc


def _api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError("swarm", response=response, explanation=explanation)


@pytest.fixture
async def backend():
    made = SwarmBackend(SessionConfig(backend="swarm"), "test-instance")
    yield made
    await made.close()


async def test_no_leader_is_swarm_unavailable_with_a_try_again_message(backend: SwarmBackend) -> None:
    with pytest.raises(SwarmUnavailable) as caught:
        await backend._call(_raise, _api_error(503, "The swarm does not have a leader."))
    assert isinstance(caught.value, BackendUnavailable)
    assert "try again" in caught.value.user_message
    assert "does not have a leader" in caught.value.detail


@pytest.mark.parametrize("error", [
    requests.exceptions.ReadTimeout("read timed out"),
    _api_error(500, "rpc error: code = DeadlineExceeded desc = context deadline exceeded"),
    _api_error(500, "rpc error: code = Unknown desc = raft: lost leadership"),
], ids=["time-out", "deadline", "leadership"])
async def test_a_change_the_managers_cannot_commit_is_swarm_unavailable(backend: SwarmBackend, error: Exception) -> None:
    with pytest.raises(SwarmUnavailable):
        await backend._call(_raise, error)


async def test_other_engine_errors_stay_what_they_are(backend: SwarmBackend) -> None:
    with pytest.raises(docker.errors.APIError) as caught:
        await backend._call(_raise, _api_error(500, "boom"))
    assert not isinstance(caught.value, SwarmUnavailable)


class _Cluster:
    """The three list calls `unreachable` makes, answered from fixed node states."""

    def __init__(self, nodes: dict[str, str], tasks: dict[str, str]) -> None:
        self._nodes, self._tasks = nodes, tasks  # node id -> state; service id -> node id

    def nodes(self) -> list[dict]:
        return [{"ID": node, "Status": {"State": state}} for node, state in self._nodes.items()]

    def services(self, filters: dict) -> list[dict]:
        assert filters == {"label": "termbridge.gateway=test-instance"}
        return [{"ID": service} for service in self._tasks]

    def tasks(self, filters: dict) -> list[dict]:
        return [{"ID": f"t-{s}", "ServiceID": s, "NodeID": n, "CreatedAt": "2026-12-01T00:00:00Z"}
                for s, n in self._tasks.items() if s in filters["service"]]


async def test_a_node_a_new_leader_has_not_heard_from_yet_is_not_a_lost_host(
    backend: SwarmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a leader election (quorum back after a loss) Swarm marks every node that is not down
    "unknown" until it reports in: sessions there go on. Down, disconnected or removed nodes are
    lost hosts."""
    cluster = _Cluster(
        nodes={"n-unknown": "unknown", "n-ready": "ready", "n-down": "down", "n-disc": "disconnected"},
        tasks={"s-unknown": "n-unknown", "s-ready": "n-ready", "s-down": "n-down", "s-disc": "n-disc",
               "s-removed": "n-removed"},
    )
    monkeypatch.setattr(backend, "_api", lambda: cluster)
    assert await backend.unreachable() == {"s-down", "s-disc", "s-removed"}


class _Removed(_Cluster):
    """A service removed between the list and the task query: Docker answers 404."""

    def tasks(self, filters: dict) -> list[dict]:
        raise _not_found("service s-ready not found")

    def inspect_service(self, service_id: str) -> dict:
        return {"ID": service_id}


def _not_found(explanation: str) -> docker.errors.NotFound:
    response = requests.Response()
    response.status_code = 404
    return docker.errors.NotFound("tasks", response=response, explanation=explanation)


async def test_a_service_removed_between_two_calls_is_gone_not_an_error(
    backend: SwarmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session ending while the host watch or a poll asks about it: poll says gone, the host
    watch sees nothing lost this round (and asks again at the next)."""
    cluster = _Removed(nodes={"n-ready": "ready"}, tasks={"s-ready": "n-ready"})
    monkeypatch.setattr(backend, "_api", lambda: cluster)
    state = await backend.poll("s-ready")
    assert not state.running and state.gone
    assert await backend.unreachable() == set()
