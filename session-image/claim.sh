#!/bin/sh
# termbridge-claim: the forced command of the gateway's claim key in a pooled container under
# Swarm (no `docker exec` reaches another node). SSH_ORIGINAL_COMMAND is "USER UID"; the claim key
# goes first, then termbridge-adduser makes the account, allows only that user and tells sshd.
set -eu
state=/run/termbridge
# shellcheck disable=SC2086
set -- ${SSH_ORIGINAL_COMMAND:-}
[ "$#" -eq 2 ] || { echo "termbridge: usage: USER UID" >&2; exit 2; }
case "$1" in
    [a-z_]*) ;;
    *) echo "termbridge: bad user name" >&2; exit 2 ;;
esac
case "$1" in
    *[!a-z0-9_.-]*) echo "termbridge: bad user name" >&2; exit 2 ;;
esac
[ "${#1}" -le 32 ] || { echo "termbridge: user name too long" >&2; exit 2; }
rm -f "$state/claim_keys/root"
exec /usr/local/sbin/termbridge-adduser "$1" "$2"
