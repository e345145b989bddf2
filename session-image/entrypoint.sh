#!/bin/sh
# Sets up the session's accounts and keys on tmpfs, then becomes the session holder, which runs
# sshd and keeps the session's shell (started on the first `tb-holder attach`) alive between
# gateway connections. The container ends with the holder: when the shell exits, after
# TERMBRIDGE_IDLE_TIMEOUT seconds with nobody attached, or at TERMBRIDGE_MAX_LIFETIME.
# TERMBRIDGE_USER: login name (validated by the gateway); empty for a pooled container, whose
# account `termbridge-adduser` makes when a login claims it. TERMBRIDGE_UID: its uid (login mode).
# TERMBRIDGE_MODE: login | root. TERMBRIDGE_HOME: ephemeral | persistent (the gateway bound the
# person's own file system at /home/USER). A pooled container under Swarm also gets claim_key.pub
# in the tar.
# stdin: a tar with ssh_host_ed25519_key, ssh_host_ed25519_key.pub and authorized_keys, written
# by the gateway right after start (never on disk, never in `docker inspect`), then EOF; in a
# pooled container on one engine the gateway keeps it open after the tar for the claim
# (termbridge-adduser --claim; tar stops at the archive's end, padded to tar's 10 KiB record); or
# TERMBRIDGE_KEYS_FILE: the same tar as a Swarm secret (services have no stdin).
# TERMBRIDGE_NETGUARD=self (Swarm, where no gateway can enter the container's network namespace
# from the host): the entrypoint shuts the network itself with NET_ADMIN, then drops it (and
# SETPCAP, which dropping takes) from every set before anything else runs.
# Always: no_new_privs for everything after the entrypoint (Swarm services cannot ask Docker).
set -eu

user="${TERMBRIDGE_USER:-}"
mode="${TERMBRIDGE_MODE:-login}"
state=/run/termbridge
base=/etc/termbridge/base

umask 022
mkdir -p "$state/etc" "$state/sshd_config.d" /run/sshd
chmod 0755 "$state" /run/sshd
if [ -n "${TERMBRIDGE_KEYS_FILE:-}" ]; then
    (umask 077 && tar -x -o -C "$state" -f "$TERMBRIDGE_KEYS_FILE")
else
    (umask 077 && tar -x -o -C "$state" -f -)
fi
exec 3<&0 </dev/null
test -s "$state/ssh_host_ed25519_key" || { echo "termbridge: no host key received" >&2; exit 1; }
test -s "$state/authorized_keys" || { echo "termbridge: no client key received" >&2; exit 1; }
chmod 0600 "$state/ssh_host_ed25519_key"
chmod 0644 "$state/authorized_keys" "$state/ssh_host_ed25519_key.pub"

for f in passwd group shadow gshadow; do
    cp "$base/$f" "$state/etc/$f"
done
chmod 0600 "$state/etc/shadow" "$state/etc/gshadow"

if [ "$mode" = root ]; then
    # "*" keeps the account usable by key while no password can match.
    sed -i 's/^root:[^:]*:/root:*:/' "$state/etc/shadow"
    # The root filesystem is writable in this mode: real files, so that apt and useradd work.
    for f in passwd group shadow gshadow; do
        cp -p "$state/etc/$f" "/etc/$f.termbridge" && mv -f "/etc/$f.termbridge" "/etc/$f"
    done
    printf 'AllowUsers root\nPermitRootLogin prohibit-password\n' > "$state/sshd_config.d/10-mode.conf"
elif [ -n "$user" ]; then
    termbridge-adduser "$user" "${TERMBRIDGE_UID:-}" "${TERMBRIDGE_HOME:-ephemeral}"
elif [ -s "$state/claim_key.pub" ]; then
    # Pooled under Swarm (no `docker exec` from the gateway): the gateway claims it over SSH as
    # root with its claim key, whose only command is termbridge-claim USER UID.
    mkdir -p "$state/claim_keys"
    printf 'restrict,command="/usr/local/sbin/termbridge-claim" %s\n' "$(cat "$state/claim_key.pub")" \
        > "$state/claim_keys/root"
    chmod 0644 "$state/claim_keys/root"
    # root for the claim key alone; then the members of termbridge-session, a group with no
    # member until the claim's account joins it: sshd needs no reload to let that account in.
    printf 'AllowGroups termbridge-session root\nPermitRootLogin forced-commands-only\n' > "$state/sshd_config.d/10-mode.conf"
else
    # Pooled on one engine: sshd is ready now and lets in the members of termbridge-session, a
    # group with no member until the claim's account joins it; no reload between the claim and
    # the login. The claim comes on stdin (termbridge-adduser --claim).
    printf 'AllowGroups termbridge-session\nPermitRootLogin no\nDenyUsers root\n' > "$state/sshd_config.d/10-mode.conf"
    (setpriv --no-new-privs termbridge-adduser --claim <&3 3<&- &)
fi
exec 3<&-

drop=""
if [ "${TERMBRIDGE_NETGUARD:-}" = self ]; then
    nft -f /etc/termbridge/netguard.nft
    # Dropping from the bounding set takes SETPCAP, which goes too.
    drop="--bounding-set -net_admin,-setpcap --inh-caps -net_admin,-setpcap"
fi
# shellcheck disable=SC2086
exec setpriv --no-new-privs $drop -- /usr/local/bin/tb-holder serve -- /usr/sbin/sshd -D -e
