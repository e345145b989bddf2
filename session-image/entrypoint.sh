#!/bin/sh
# Sets up the session's accounts and keys on tmpfs, then runs sshd in the foreground.
# TERMBRIDGE_USER: login name (validated by the gateway); TERMBRIDGE_MODE: login | root.
# stdin: a tar with ssh_host_ed25519_key, ssh_host_ed25519_key.pub and authorized_keys, written
# by the gateway right after start (never on disk, never in `docker inspect`), then EOF.
set -eu

user="${TERMBRIDGE_USER:?TERMBRIDGE_USER is required}"
mode="${TERMBRIDGE_MODE:-login}"
state=/run/termbridge
base=/etc/termbridge/base

umask 022
mkdir -p "$state/etc" "$state/sshd_config.d" /run/sshd
chmod 0755 "$state" /run/sshd
(umask 077 && tar -x -o -C "$state" -f -)
exec </dev/null
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
else
    home="/home/$user"
    today=$(( $(date +%s) / 86400 ))
    printf '%s:x:1000:1000::%s:/bin/bash\n' "$user" "$home" >> "$state/etc/passwd"
    printf '%s:x:1000:\n' "$user" >> "$state/etc/group"
    printf '%s:*:%s:0:99999:7:::\n' "$user" "$today" >> "$state/etc/shadow"
    printf '%s:!::\n' "$user" >> "$state/etc/gshadow"
    mkdir -p "$home"
    chmod 0750 "$home"
    cp -R /etc/skel/. "$home/"
    chown -R 1000:1000 "$home"
    printf 'AllowUsers %s\nPermitRootLogin no\n' "$user" > "$state/sshd_config.d/10-mode.conf"
fi

exec /usr/sbin/sshd -D -e
