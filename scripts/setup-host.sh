#!/usr/bin/env bash
# Prepares this machine for `make run` and `make test`, as root on Debian 12 or Ubuntu 24.04.
# It installs with apt-get only what is missing (and says what), starts dockerd when nothing runs
# it, and builds the base image the session image needs when that is missing.
#
#   scripts/setup-host.sh host run|test    packages the mode needs, then a running dockerd
#   scripts/setup-host.sh base run|test    prints the base image for the session image
#   scripts/setup-host.sh warn IMAGE        repeats the warning unless IMAGE is the production base
#
# `base test` is a local Debian bookworm image (debootstrap + docker import), so the tests never
# need a registry. `base run` is ubuntu:24.04, the production base; when no registry serves it,
# the same local Debian base stands in, with a loud warning.
set -euo pipefail

PRODUCTION_BASE=ubuntu:24.04
LOCAL_BASE=termbridge/test-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG_DIR=${TMPDIR:-/tmp}

say() { echo "setup-host: $*" >&2; }

# command -> Debian/Ubuntu package that provides it
RUN_NEEDS=(
    "docker docker.io" "dockerd docker.io" "npm npm" "iptables iptables" "ip iproute2"
    "nsenter util-linux" "losetup mount" "mkfs.ext4 e2fsprogs" "resize2fs e2fsprogs"
)
TEST_NEEDS=(
    "chromium chromium" "ssh openssh-client" "scp openssh-client" "sftp openssh-client"
    "sshpass sshpass" "nginx nginx" "redis-server redis-server" "debootstrap debootstrap"
    "systemd-analyze systemd" "pgrep procps" "useradd passwd"
)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "run this as root: it installs packages, starts dockerd, and the gateway needs PAM and Docker"
        exit 1
    fi
}

install_packages() {
    [ $# -gt 0 ] || return 0
    need_root
    say "installing with apt-get: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "$@" >"$LOG_DIR/termbridge-apt.log" 2>&1 \
        || { tail -20 "$LOG_DIR/termbridge-apt.log" >&2; say "apt-get install failed"; exit 1; }
}

missing_packages() {
    local pair command package wanted=()
    for pair in "$@"; do
        read -r command package <<<"$pair"
        command -v "$command" >/dev/null 2>&1 || wanted+=("$package")
    done
    # the venv needs ensurepip, which Debian ships apart from python3
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || wanted+=(python3-venv)
    [ -e /etc/ssl/certs/ca-certificates.crt ] || wanted+=(ca-certificates)
    printf '%s\n' "${wanted[@]}" | sort -u | grep -v '^$' || true
}

start_dockerd() {
    docker info >/dev/null 2>&1 && return 0
    need_root
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        say "starting docker with systemctl"
        systemctl start docker || true
    fi
    if ! docker info >/dev/null 2>&1; then
        say "starting dockerd in the background (log: $LOG_DIR/termbridge-dockerd.log)"
        setsid nohup dockerd >"$LOG_DIR/termbridge-dockerd.log" 2>&1 </dev/null &
    fi
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    tail -20 "$LOG_DIR/termbridge-dockerd.log" >&2 || true
    say "dockerd did not come up within 60 s"
    exit 1
}

host() {
    local mode=$1 wanted
    local needs=("${RUN_NEEDS[@]}")
    [ "$mode" = test ] && needs+=("${TEST_NEEDS[@]}")
    mapfile -t wanted < <(missing_packages "${needs[@]}")
    install_packages "${wanted[@]}"
    start_dockerd
}

local_base() {
    docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 && return 0
    need_root
    local wanted=()
    command -v debootstrap >/dev/null 2>&1 || wanted+=(debootstrap)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || wanted+=(debian-archive-keyring)
    install_packages "${wanted[@]}"
    local root
    root=$(mktemp -d)
    chmod 0755 "$root"  # the image's / keeps this mode; mktemp's 0700 locks sshd out of it
    say "building $LOCAL_BASE: debootstrap --variant=minbase bookworm (a minute or two)"
    if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
            bookworm "$root" "$DEBIAN_MIRROR" >"$LOG_DIR/termbridge-debootstrap.log" 2>&1; then
        tail -20 "$LOG_DIR/termbridge-debootstrap.log" >&2
        rm -rf "$root"
        say "debootstrap failed"
        exit 1
    fi
    tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
    rm -rf "$root"
}

warn_local_base() {
    say "################################################################################"
    say "NO REGISTRY SERVES $PRODUCTION_BASE: the session image is built FROM the local"
    say "Debian bookworm base $LOCAL_BASE instead."
    say "SESSIONS RUN DEBIAN 12, NOT UBUNTU 24.04. Run \`make run\` again once the registry"
    say "can be reached to build FROM $PRODUCTION_BASE."
    say "################################################################################"
}

base() {
    local mode=$1
    if [ "$mode" = run ]; then
        if docker image inspect "$PRODUCTION_BASE" >/dev/null 2>&1 \
                || timeout 120 docker pull -q "$PRODUCTION_BASE" >/dev/null 2>&1; then
            echo "$PRODUCTION_BASE"
            return 0
        fi
        local_base
        warn_local_base
        echo "$LOCAL_BASE"
    else
        local_base
        echo "$LOCAL_BASE"
    fi
}

case "${1:-} ${2:-}" in
    "host run" | "host test") host "$2" ;;
    "base run" | "base test") base "$2" ;;
    "warn "*) [ "${2:-}" = "$PRODUCTION_BASE" ] || warn_local_base ;;
    *) echo "usage: $0 host|base run|test, or $0 warn IMAGE" >&2; exit 2 ;;
esac
