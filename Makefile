# Two commands on a fresh Debian 12 or Ubuntu 24.04 machine, as root:
#   make run    host packages and dockerd, venv, web assets, session image, then serve on 127.0.0.1:8080
#   make test   host packages and dockerd, venv, web assets, session image if stale, then the suite
# and, to run gateways as a Swarm service (etc/swarm/), `make gateway-image`.
# scripts/setup-host.sh installs only what is missing and says what it installs.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/termbridge.toml
# Empty: `make run` builds FROM ubuntu:24.04 (a local Debian base when no registry serves it),
# `make test` FROM a local Debian bookworm base (debootstrap, no registry needed).
BASE_IMAGE ?=
IMAGE ?= termbridge/session:latest
PYTEST_ARGS ?=

BIN := $(VENV)/bin
SETUP := scripts/setup-host.sh
# Which host set-up the goal needs; prerequisites inherit the goal's value.
HOST_MODE := run
test image-if-stale: HOST_MODE := test

.PHONY: run test host venv assets image image-if-stale gateway-image pam clean

host:
	$(SETUP) host $(HOST_MODE)

$(BIN)/termbridge: pyproject.toml | host
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/termbridge

web/node_modules/.package-lock.json: web/package.json web/package-lock.json | host
	cd web && npm ci --no-audit --no-fund
	touch $@

assets: web/node_modules/.package-lock.json

# The session image, built from the base this goal needs (or BASE_IMAGE when given). `make test`
# rebuilds it only when session-image/ or the base changed (the image carries their digest).
BUILD_IMAGE = base="$(BASE_IMAGE)"; [ -n "$$base" ] || base=$$($(SETUP) base $(HOST_MODE)) || exit 1; \
	$(BIN)/termbridge image build --base "$$base" --config $(CONFIG) $(BUILD_FLAGS) \
	&& { [ $(HOST_MODE) = test ] || $(SETUP) warn "$$base"; }

image: venv host
	@$(BUILD_IMAGE)

image-if-stale: BUILD_FLAGS := --if-stale
image-if-stale: venv host
	@$(BUILD_IMAGE)

# The gateway image for running gateways as a Swarm service (etc/swarm/): FROM debian:bookworm-slim,
# or BASE_IMAGE when given.
gateway-image: venv
	PYTHON=$(BIN)/python scripts/gateway-image.sh $(if $(BASE_IMAGE),--base $(BASE_IMAGE))

pam:
	@test -e /etc/pam.d/termbridge || install -m 0644 etc/pam.d/termbridge /etc/pam.d/termbridge

run: host venv assets image pam
	$(BIN)/termbridge serve --config $(CONFIG)

# pytest's exit 5 (nothing collected) fails too, with a word about why.
test: host venv assets image-if-stale
	@$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc != 5 ] || echo "make: pytest collected no tests; check PYTEST_ARGS"; exit $$rc; }

clean:
	rm -rf $(VENV) web/node_modules
