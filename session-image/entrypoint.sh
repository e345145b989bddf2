#!/bin/sh
# Creates the session's user, then runs sshd in the foreground as PID 1's only child.
# TERMBRIDGE_USER: login name (validated by the gateway); TERMBRIDGE_MODE: login | root.
set -eu

user="${TERMBRIDGE_USER:?TERMBRIDGE_USER is required}"
mode="${TERMBRIDGE_MODE:-login}"

mkdir -p /etc/ssh/sshd_config.d
if [ "$mode" = root ]; then
    printf 'AllowUsers root\nPermitRootLogin prohibit-password\n' > /etc/ssh/sshd_config.d/10-termbridge.conf
    # "*" keeps the account usable by key while no password can match.
    usermod -p '*' root
else
    if ! id "$user" >/dev/null 2>&1; then
        useradd --create-home --uid 1000 --user-group --shell /bin/bash "$user"
    fi
    usermod -p '*' "$user"
    printf 'AllowUsers %s\nPermitRootLogin no\n' "$user" > /etc/ssh/sshd_config.d/10-termbridge.conf
fi

test -s /etc/ssh/ssh_host_ed25519_key || { echo "termbridge: no host key injected" >&2; exit 1; }
test -s /etc/termbridge/authorized_keys || { echo "termbridge: no client key injected" >&2; exit 1; }
exec /usr/sbin/sshd -D -e
