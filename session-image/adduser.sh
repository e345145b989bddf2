#!/bin/sh
# termbridge-adduser USER UID [persistent]: the session's account, on tmpfs (session.user = login).
# Run by the entrypoint before sshd starts, or when a login claims a pooled container:
# `termbridge-adduser --claim` waits in a pooled container for one line "USER UID" on its stdin
# (the gateway's attach, kept open since it handed over the keys) and answers on stdout with
# "termbridge-claim ok" or "termbridge-claim failed: ...". In a pooled container sshd already
# runs and lets in the group termbridge-session only, which the account joins: no reload.
# UID (also the gid) comes from the gateway: uid_base + the login's host uid, no host account's.
# A container gets one account, once.
# persistent: the gateway bound the person's own file system at /home/USER, owned by UID, 0700;
# it is checked and kept as it is (/etc/skel only goes into an empty one). Root here has no
# CAP_DAC_OVERRIDE, so whatever reads or writes in it runs as UID.
set -eu

state=/run/termbridge
if [ "${1:-}" = --claim ]; then
    # No line (the gateway let go of the container): never claimed, nothing to do.
    IFS=' ' read -r user uid || exit 0
    exec 3>&1
    if out=$(termbridge-adduser "$user" "$uid" 2>&1 >&3); then
        echo "termbridge-claim ok"
    else
        echo "termbridge-claim failed: $out" | tr -d '\r' | head -c 300
        echo
    fi
    exit 0
fi

user="${1:?usage: termbridge-adduser USER UID [persistent] | --claim}"
uid="${2:?usage: termbridge-adduser USER UID [persistent] | --claim}"
home_mode="${3:-ephemeral}"
case "$uid" in
    ''|*[!0-9]*) echo "termbridge: bad uid '$uid'" >&2; exit 2 ;;
esac
if [ "${#uid}" -gt 10 ] || [ "$uid" -lt 1000 ] || [ "$uid" -gt 2147483646 ]; then
    echo "termbridge: uid $uid is out of range" >&2
    exit 2
fi
if [ -e "$state/account" ]; then
    echo "termbridge: this container already has its account" >&2
    exit 1
fi
: > "$state/account"
home="/home/$user"
today=$(( $(date +%s) / 86400 ))
printf '%s:x:%s:%s::%s:/bin/bash\n' "$user" "$uid" "$uid" "$home" >> "$state/etc/passwd"
printf '%s:x:%s:\n' "$user" "$uid" >> "$state/etc/group"
printf '%s:*:%s:0:99999:7:::\n' "$user" "$today" >> "$state/etc/shadow"
printf '%s:!::\n' "$user" >> "$state/etc/gshadow"
if [ -s /run/sshd.pid ]; then
    # pooled: the running sshd lets in the members of termbridge-session (AllowGroups)
    sed -i "s/^termbridge-session:\([^:]*\):\([0-9]*\):\$/termbridge-session:\1:\2:$user/" "$state/etc/group"
fi
if [ "$home_mode" = persistent ]; then
    if [ ! -d "$home" ] || [ "$(stat -c %d "$home")" = "$(stat -c %d /home)" ]; then
        echo "termbridge: the persistent home is not mounted at $home" >&2
        exit 1
    fi
    if [ "$(stat -c %u:%g "$home")" != "$uid:$uid" ]; then
        echo "termbridge: the persistent home belongs to $(stat -c %u:%g "$home"), not $uid" >&2
        exit 1
    fi
    setpriv --reuid="$uid" --regid="$uid" --clear-groups \
        sh -c '[ -n "$(ls -A "$1")" ] || cp -R /etc/skel/. "$1/"' sh "$home"
else
    mkdir -p -m 0750 "$home"
    cp -R /etc/skel/. "$home/"
    chown -R "$uid:$uid" "$home"
fi
printf 'AllowUsers %s\nPermitRootLogin no\n' "$user" > "$state/sshd_config.d/10-mode.conf"
# Last: the session holder (tb-holder) lets this uid attach once it reads it here (told at once
# when it already runs, in a pooled container).
printf '%s\n' "$uid" > "$state/account"
if [ -s "$state/holder.pid" ]; then
    read -r holder < "$state/holder.pid"
    kill -USR1 "$holder"
fi
