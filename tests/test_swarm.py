"""The Swarm backend on a real three-node Swarm (testbed/swarm.py): sessions as services, spread
over nodes, with the session's limits, labels and hardening as the node that runs them reports."""

from __future__ import annotations

import pytest

from helpers import TEST_IMAGE
from testbed.swarm import SwarmCluster

pytestmark = pytest.mark.swarm


def test_cluster_has_a_manager_two_workers_and_the_image_everywhere(swarm_cluster: SwarmCluster) -> None:
    assert swarm_cluster.node_states() == {n.name: "ready" for n in swarm_cluster.nodes}
    roles = {n.attrs["Description"]["Hostname"]: n.attrs["Spec"]["Role"] for n in swarm_cluster.manager.client().nodes.list()}
    assert sorted(roles.values()) == ["manager", "worker", "worker"]
    image_id = swarm_cluster.host.images.get(TEST_IMAGE).id
    for node in swarm_cluster.nodes:
        assert node.client().images.get(TEST_IMAGE).id == image_id
