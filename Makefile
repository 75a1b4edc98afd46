# llm-endpoints — the two commands a newcomer needs are `make run` and `make test`.
# Every target installs what it needs itself: a uv-managed virtualenv in .venv (pinned by uv.lock)
# and the control-plane binaries built from Go modules (cached outside the clone, see tests/cluster/tools).

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .cache/bootstrap/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: help run test lint typecheck unit cluster-tests serving-tests e2e crds check-crds cluster-bin bench venv clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: venv cluster-bin  ## Start the local control plane and the operator (Ctrl-C stops everything)
	$(PY) -m tests.cluster.local

test: venv cluster-bin lint typecheck  ## Lint, type-check, then every test suite
	$(PY) -m pytest tests

lint: venv  ## ruff
	$(VENV)/bin/ruff check .

typecheck: venv  ## mypy --strict on our packages and tests
	$(VENV)/bin/mypy

unit: venv  ## Pure-function tests only (seconds)
	$(PY) -m pytest tests/unit

cluster-tests: venv cluster-bin  ## Tests against the real local control plane
	$(PY) -m pytest tests/cluster

serving-tests: venv  ## The serving server with real models and real clients
	$(PY) -m pytest tests/serving

cluster-bin:  ## Build kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, helm (once)
	@command -v go >/dev/null || { echo "make: Go is needed to build the control plane (go.dev/doc/install)"; exit 1; }
	@bash tests/cluster/tools/build.sh

venv: $(VENV)/.synced  ## Create .venv from uv.lock

$(VENV)/.synced: uv.lock pyproject.toml operator/pyproject.toml serving/pyproject.toml
	@test -x $(UV) || { $(PYTHON) -m venv .cache/bootstrap && .cache/bootstrap/bin/pip install -q uv==$(UV_VERSION); }
	$(UV) sync --frozen
	@touch $@

clean:  ## Remove the virtualenv and local caches in the clone (Go and uv caches stay)
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
