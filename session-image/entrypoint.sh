#!/bin/sh
# Sets up the session's accounts and keys on tmpfs, then becomes the session holder, which runs
# sshd and keeps the session's shell (started on the first `tb-holder attach`) alive between
# gateway connections. The container ends with the holder: when the shell exits, after
# TERMBRIDGE_IDLE_TIMEOUT seconds with nobody attached, or at TERMBRIDGE_MAX_LIFETIME.
# TERMBRIDGE_USER: login name (validated by the gateway); empty for a pooled container, whose
# account `termbridge-adduser` makes when a login claims it. TERMBRIDGE_UID: its uid (login mode).
# TERMBRIDGE_MODE: login | root. TERMBRIDGE_HOME: ephemeral | persistent (the gateway bound the
# person's own file system at /home/USER).
# stdin: a tar with ssh_host_ed25519_key, ssh_host_ed25519_key.pub and authorized_keys, written
# by the gateway right after start (never on disk, never in `docker inspect`), then EOF; in a
# pooled container the gateway keeps it open after the tar for the claim (termbridge-adduser
# --claim). tar stops at the archive's end: the gateway pads it to tar's 10 KiB record.
set -eu

user="${TERMBRIDGE_USER:-}"
mode="${TERMBRIDGE_MODE:-login}"
state=/run/termbridge
base=/etc/termbridge/base

umask 022
mkdir -p "$state/etc" "$state/sshd_config.d" /run/sshd
chmod 0755 "$state" /run/sshd
(umask 077 && tar -x -o -C "$state" -f -)
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
else
    # Pooled: sshd is ready now and lets in the members of termbridge-session, a group with no
    # member until the claim's account joins it; no reload between the claim and the login.
    printf 'AllowGroups termbridge-session\nPermitRootLogin no\nDenyUsers root\n' > "$state/sshd_config.d/10-mode.conf"
    (termbridge-adduser --claim <&3 3<&- &)
fi
exec 3<&-

exec /usr/local/bin/tb-holder serve -- /usr/sbin/sshd -D -e
