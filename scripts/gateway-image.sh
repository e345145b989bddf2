#!/usr/bin/env bash
# Builds the gateway image (etc/gateway/Dockerfile) from this checkout:
#
#   scripts/gateway-image.sh [--base IMAGE] [--tag TAG] [--if-stale] [--sssd]
#
# The build context is a temporary folder: the Dockerfile, its entrypoint, the PAM service and a
# wheel folder (termbridge with its web assets, plus its dependencies, built here with the
# checkout's Python, which must be a 3.11 like the image's). --if-stale skips the build when TAG was built from the same sources and base
# (the image carries their digest in the label termbridge.source). --sssd adds Debian's SSSD
# clients (libnss-sss, libpam-sss), for accounts from a directory service (etc/swarm/sssd.yml).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=debian:bookworm-slim
TAG=termbridge/gateway:latest
IF_STALE=0
DIRECTORY_PACKAGES=""
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --if-stale) IF_STALE=1; shift ;;
        --sssd) DIRECTORY_PACKAGES="libnss-sss libpam-sss"; shift ;;
        *) echo "usage: $0 [--base IMAGE] [--tag TAG] [--if-stale] [--sssd]" >&2; exit 2 ;;
    esac
done

# What the image is made of: the package, its assets, the deploy kit, and the base.
digest=$( { echo "$BASE $DIRECTORY_PACKAGES"; find bridge web/templates web/static etc pyproject.toml setup.py -type f \
    -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
if [ "$IF_STALE" = 1 ] && [ "$(docker image inspect -f '{{ index .Config.Labels "termbridge.source" }}' "$TAG" 2>/dev/null)" = "$digest" ]; then
    echo "gateway-image: $TAG is up to date ($digest)" >&2
    exit 0
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp etc/gateway/Dockerfile etc/gateway/entrypoint.sh "$ctx/"
cp etc/pam.d/termbridge "$ctx/termbridge.pam"
echo "gateway-image: building wheels with $PYTHON" >&2
# The image installs offline (--no-index): its builds reach no index. Debian 12's Python is 3.11.2,
# where redis also needs async-timeout (the checkout's newer Python may not).
"$PYTHON" -m pip wheel --quiet --no-build-isolation --wheel-dir "$ctx/wheels" . 'async-timeout>=4.0.3' >&2
echo "gateway-image: building $TAG FROM $BASE" >&2
docker build --quiet --build-arg BASE_IMAGE="$BASE" --build-arg DIRECTORY_PACKAGES="$DIRECTORY_PACKAGES" --label termbridge.source="$digest" -t "$TAG" "$ctx" >/dev/null
echo "gateway-image: built $TAG ($digest)" >&2
