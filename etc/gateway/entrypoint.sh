#!/bin/sh
# The gateway container's entrypoint: point the account files at the mounted host /etc (or back
# at the image's own), then run `termbridge "$@"` as PID 1's only child, which gets SIGTERM.
set -eu
HOST_ETC=/run/host-etc
if [ -r "$HOST_ETC/passwd" ] && [ -r "$HOST_ETC/shadow" ] && [ -r "$HOST_ETC/group" ]; then
    echo "termbridge-gateway: accounts from the host's files in $HOST_ETC (read live)" >&2
else
    echo "termbridge-gateway: no host account files in $HOST_ETC: the image's own accounts" \
         "(and a directory service, if the image has one)" >&2
    mkdir -p "$HOST_ETC"
    for f in passwd shadow group gshadow; do
        cp -p "/etc/termbridge/image-etc/$f" "$HOST_ETC/$f"
    done
fi
exec termbridge "$@"
