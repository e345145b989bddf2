#!/bin/sh
# The gateway container's entrypoint: point the account files at the mounted host /etc, or at the
# image's own (GATEWAY_ACCOUNTS=image, or no host files mounted: a directory service through
# SSSD, or only the image's accounts), then run `termbridge "$@"` with the container's signals.
set -eu
HOST_ETC=/run/host-etc
if [ "${GATEWAY_ACCOUNTS:-host}" = host ] && [ -r "$HOST_ETC/passwd" ] && [ -r "$HOST_ETC/shadow" ] \
        && [ -r "$HOST_ETC/group" ]; then
    echo "termbridge-gateway: accounts from the host's files in $HOST_ETC (read live)" >&2
    ln -sfn "$HOST_ETC" /run/termbridge-accounts
else
    echo "termbridge-gateway: the image's own accounts (and a directory service, if the image has one)" >&2
    ln -sfn /etc/termbridge/image-etc /run/termbridge-accounts
fi
exec termbridge "$@"
