# meshwright: everything a fresh Debian 12 machine needs, as root, from two commands:
#   make demo    bring the default lab up and converge the mesh on it
#   make test    everything CI runs
# Every step is idempotent and cached.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
COLLECTION := $(CACHE)/collections/ansible_collections/containers/podman
# This checkout is the collection meshwright.mesh: linked into the collections path, so that
# playbooks, tests and ansible-lint use it by its fully qualified names, as users do.
SELF := $(CACHE)/collections/ansible_collections/meshwright/mesh
ARTIFACT := roles/node/files/meshwright-node.pyz
NODE_SOURCES := $(shell find src/meshwright -name '*.py' -not -path '*/lab/*' -not -path '*/plan/*' -not -name '*_cli.py' -not -name 'graph.py' -not -name 'status.py') requirements.lock
export CONTAINERS_CONF := $(CURDIR)/src/meshwright/lab/containers.conf
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/$(CACHE)/collections
export PATH := $(CURDIR)/$(BIN):$(PATH)

DEB_PACKAGES := podman runc netavark aardvark-dns uidmap fuse-overlayfs debootstrap \
	wireguard-tools wireguard-go iproute2 nftables iptables conntrack tcpdump iperf3 iputils-ping \
	ca-certificates python3-venv graphviz prometheus coturn stun-client

.PHONY: help setup deb venv collections artifact collection image demo demo-down test lint unit lab-test molecule clean

help:
	@echo "make demo       bring the default lab up, converge the mesh on it, show the plan"
	@echo "                (make demo-down removes it)"
	@echo "make test       lint, unit and lab tests: everything CI runs"
	@echo "make setup      only install what the two above need"
	@echo "make collection build the collection tarball and the package's wheel into dist/"

setup: deb venv collections artifact image

# Debian starts a Prometheus server and a TURN server (coturn) when it installs them; the tests
# run their own, on the lab and on loopback (without systemd running, as in a container, there
# is nothing to stop: best effort).
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi; \
	for service in prometheus coturn; do \
	  if systemctl is-enabled --quiet $$service 2>/dev/null; then \
	    systemctl disable --quiet $$service 2>/dev/null || true; \
	    systemctl stop $$service 2>/dev/null || true; \
	  fi; \
	done

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

collections: $(COLLECTION)/MANIFEST.json $(SELF)
$(SELF):
	mkdir -p $(dir $@)
	ln -sfn $(CURDIR) $@

# The node artifact (the code relays and sites run, one zipapp), named by its content hash.
artifact: $(ARTIFACT)
$(ARTIFACT): $(NODE_SOURCES) | venv
	$(BIN)/meshwright artifact --output $(dir $@)

# What users install: the collection tarball (ansible-galaxy) and the controller's Python
# package (pip), both into dist/.
collection: artifact
	$(BIN)/ansible-galaxy collection build --force --output-path dist .
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps -w dist .

$(COLLECTION)/MANIFEST.json: requirements-collections.txt | venv
	$(BIN)/pip download -q --disable-pip-version-check --no-deps --require-hashes \
	  -r requirements-collections.txt -d $(CACHE)/wheels
	rm -rf $(COLLECTION)
	$(BIN)/python -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	  [z.extract(n, sys.argv[2]) for n in z.namelist() \
	   if n.startswith("ansible_collections/containers/podman/")]' \
	  $(CACHE)/wheels/ansible-12.3.0-py3-none-any.whl $(CACHE)/collections
	test -f $@ && touch $@

image: deb venv
	$(BIN)/meshwright lab image

demo: setup
	$(BIN)/meshwright lab up
	$(BIN)/ansible-playbook meshwright.mesh.site

demo-down: venv
	$(BIN)/meshwright lab down

lint: venv collections artifact
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/ansible-lint --profile production

unit: venv artifact
	$(BIN)/pytest -q tests/unit

lab-test: setup
	$(BIN)/pytest -q tests/lab

molecule: setup
	$(BIN)/molecule test --scenario-name default

# Molecule first, so that the run ends with pytest's summary line. Molecule's own last lines
# are its destroy step's: when verify fails, its failures are repeated at the very end (a
# wide COLUMNS keeps pytest from cutting each failure's message short).
test: setup lint
	@mkdir -p $(CACHE); set -o pipefail; \
	COLUMNS=250 $(BIN)/molecule test --scenario-name default 2>&1 | tee $(CACHE)/molecule.log || { \
	  echo "molecule failed; what its verifier reported:"; \
	  sed 's/\x1b\[[0-9;]*m//g' $(CACHE)/molecule.log \
	    | sed -n '/short test summary info/,/ in [0-9.]*s/p' | cut -c1-400; \
	  exit 1; }
	$(BIN)/pytest -q tests

clean: demo-down
	rm -rf $(CACHE) $(VENV)
