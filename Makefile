# Two commands for a fresh machine: `make run` and `make test` (README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cloudhub.yaml
TESTS ?= tests

.PHONY: run test venv lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
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

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info twisted/plugins/dropin.cache
