# Two commands for a fresh machine: `make run` and `make test` (README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cloudhub.yaml
TESTS ?= tests

.PHONY: run test venv lint typecheck clean package-check wheel image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The metadata and dependencies are in pyproject.toml, the package layout in setup.py.
$(VENV)/.installed: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	exec $(BIN)/twistd -n --logger cloudhub.logs.observer cloudhub --config $(CONFIG)

test: venv
	$(BIN)/python -m twisted.trial $(TRIALFLAGS) $(TESTS)

lint: venv
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check cloudhub tests twisted

typecheck: venv
	$(BIN)/pip install --quiet mypy mypy-zope
	$(BIN)/mypy cloudhub

# Packaging (README "Install from a wheel", "Container"). package-check builds the sdist and the
# wheel from a clean copy of the checkout, installs the wheel with packaging/install.sh into a
# temporary virtualenv and runs the installed hub there (CI runs it after the tests).
package-check:
	PYTHON=$(PYTHON) bash packaging/check-install.sh

# dist/cloudhub-<version>-py3-none-any.whl (build/ removed first: a stale one can leak into it).
wheel:
	rm -rf build
	$(PYTHON) -m pip wheel --no-deps -w dist .
	rm -rf build

# cloudhub:<version>; e.g. CONTAINER_ENGINE=podman IMAGE_ARGS="--build-arg PYTHON_IMAGE=..."
CONTAINER_ENGINE ?= docker
IMAGE_ARGS ?=
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' cloudhub/__init__.py)
image:
	$(CONTAINER_ENGINE) build $(IMAGE_ARGS) -t cloudhub:$(VERSION) .

clean:
	rm -rf $(VENV) _trial_temp* build dist *.egg-info twisted/plugins/dropin.cache

# Network faults (issue 18, docs/chaos.md): root only (network namespaces, tc, iptables); the
# hub and Python edges through loss, delay, a 60 s partition and reordering (~5 minutes).
# Not part of `make test`.
.PHONY: chaos
chaos:
	@if [ "$$(id -u)" != 0 ]; then echo "make chaos: needs root (it makes network namespaces and applies tc/iptables faults inside them): run sudo make chaos" >&2; exit 1; fi
	$(MAKE) venv
	$(BIN)/python tests/chaos/chaos.py $(CHAOSFLAGS)
