#!/bin/sh
# termbridge-adduser USER: the session's account, on tmpfs (session.user = login). Run by the
# entrypoint before sshd starts, or through `docker exec` when a login claims a pooled container
# (then sshd is told to reread AllowUsers). A container gets one account, once.
set -eu

user="${1:?usage: termbridge-adduser USER}"
state=/run/termbridge
if grep -q '^[^:]*:x:1000:' "$state/etc/passwd"; then
    echo "termbridge: this container already has its account" >&2
    exit 1
fi
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
if [ -s /run/sshd.pid ]; then
    kill -HUP "$(cat /run/sshd.pid)"
fi
