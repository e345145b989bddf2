#!/bin/sh
# Starts this node's dockerd: vfs storage (the only driver that works nested here), containers
# under the cgroup /<node name>, the API on the unix socket and on this node's address on the
# test network only (plain TCP: that network is the test's own and carries nothing else).
set -eu
node="${TB_NODE:?TB_NODE names this node}"
addr=$(ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
exec dockerd --storage-driver vfs --cgroup-parent "/$node" \
    -H unix:///var/run/docker.sock -H "tcp://$addr:2375" --tls=false \
    --log-level warn
