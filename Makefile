# Two commands on a fresh machine with Docker running:
#   make run    venv, web assets, session image, then serve on 127.0.0.1:8080 (as root: PAM)
#   make test   venv, web assets, session image if missing, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/termbridge.toml
# Production builds FROM ubuntu:24.04; CI passes a local debootstrapped base instead.
BASE_IMAGE ?=
IMAGE ?= termbridge/session:latest
PYTEST_ARGS ?=

BIN := $(VENV)/bin
BASE_ARG := $(if $(BASE_IMAGE),--base $(BASE_IMAGE),)

.PHONY: run test venv assets image image-if-missing pam clean

$(BIN)/termbridge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/termbridge

web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

assets: web/node_modules/.package-lock.json

image: venv
	$(BIN)/termbridge image build $(BASE_ARG) --config $(CONFIG)

image-if-missing: venv
	@docker image inspect $(IMAGE) >/dev/null 2>&1 || $(BIN)/termbridge image build $(BASE_ARG) --config $(CONFIG)

pam:
	@test -e /etc/pam.d/termbridge || install -m 0644 etc/pam.d/termbridge /etc/pam.d/termbridge

run: venv assets image pam
	$(BIN)/termbridge serve --config $(CONFIG)

test: venv assets image-if-missing
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) web/node_modules
