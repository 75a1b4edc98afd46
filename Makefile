# llm-endpoints — the two commands a newcomer needs are `make run` and `make test`.
# Every target installs what it needs itself: a uv-managed virtualenv in .venv (pinned by uv.lock)
# and the control-plane binaries built from Go modules (cached outside the clone, see devstack/tools).

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .cache/bootstrap/bin/uv
VENV := .venv
PY := $(VENV)/bin/python

HELM = $(shell $(PY) -c "from llm_devstack.controlplane import default_bin_dir; print(default_bin_dir() / 'helm')")
ACTIONLINT = $(shell $(PY) -c "from llm_devstack.controlplane import default_bin_dir; print(default_bin_dir() / 'actionlint')")
CRD_OUTPUTS := crds/llmendpoints.yaml charts/llm-endpoints/crds/llmendpoints.yaml

.PHONY: help run test lint typecheck generated unit cluster-tests serving-tests e2e-tests crds manifests install-yaml images cluster-bin system-packages bench venv clean

help:  ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: venv cluster-bin images  ## A local SmolLM2 endpoint end to end: control plane, real local node, operator, gateway (Ctrl-C stops all)
	$(PY) -m llm_devstack

test: venv cluster-bin images lint typecheck generated  ## Lint, type-check, check generated files, then every test suite
	$(PY) -m pytest tests

lint: venv cluster-bin  ## ruff (lint and format), import-linter (which packages may import which), actionlint (CI workflows)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(ACTIONLINT) .github/workflows/*.yml

typecheck: venv  ## mypy --strict on our packages and tests
	$(VENV)/bin/mypy

generated: venv cluster-bin  ## Fail when crds/ or dist/install.yaml differ from what their sources generate
	@for out in $(CRD_OUTPUTS); do $(PY) -m llm_operator.api.crd --check --output $$out || exit 1; done
	@$(PY) -m llm_operator.api.reference --check
	@$(MAKE) -s --no-print-directory install-yaml | diff -u dist/install.yaml - >/dev/null \
	  || { echo "dist/install.yaml is stale: run 'make manifests'"; exit 1; }

crds: venv  ## Regenerate the CRD from the pydantic models (crds/, the chart's copy, docs/api.md)
	@for out in $(CRD_OUTPUTS); do $(PY) -m llm_operator.api.crd --output $$out; done
	@$(PY) -m llm_operator.api.reference

manifests: venv cluster-bin crds  ## Render dist/install.yaml from the Helm chart
	@mkdir -p dist && $(MAKE) -s --no-print-directory install-yaml > dist/install.yaml

install-yaml:
	@printf -- '# llm-endpoints install manifest, rendered from charts/llm-endpoints by `make manifests`.\n'
	@printf -- '# Apply with: kubectl apply --server-side -f install.yaml\n'
	@printf -- '# No internal network is configured: private endpoints refuse every caller until you add the\n'
	@printf -- '# cluster'"'"'s pod and service CIDRs to the gateway'"'"'s args (--internal-cidr=CIDR, repeatable).\n'
	@printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: llm-system\n'
	@$(HELM) template llm-endpoints charts/llm-endpoints --namespace llm-system --include-crds \
	  --set-json 'gateway.internalCIDRs=[]'

unit: venv  ## Pure-function tests only (seconds)
	$(PY) -m pytest tests/unit

cluster-tests: venv cluster-bin images  ## Tests against the real local control plane
	$(PY) -m pytest tests/cluster tests/gateway

serving-tests: venv  ## The serving server with real models and real clients
	$(PY) -m pytest tests/serving

e2e-tests: venv cluster-bin images  ## The whole stack: manifest -> operator -> kubelet -> serving image -> gateway -> client
	$(PY) -m pytest tests/e2e

images: venv cluster-bin  ## Build the operator, serving and pause images with buildah (layers cached; REGISTRY=... also tags them for it, PUSH=1 pushes)
	$(PY) -m llm_devstack.images build $(if $(REGISTRY),--registry $(REGISTRY)) $(if $(PUSH),--push)

cluster-bin: system-packages  ## Build kube-apiserver, controller-manager, scheduler, kubelet, kube-proxy, kubectl, etcd, kwok, helm (once)
	@command -v go >/dev/null || { echo "make: Go is needed to build the control plane (go.dev/doc/install)"; exit 1; }
	@bash devstack/tools/build.sh

# Debian packages: iproute2 (the real node's bridge), prometheus (the autoscaler's
# Prometheus source is tested against a real server), nginx (the gateway benchmark's reference proxy), curl.
SYSTEM_COMMANDS := ip:iproute2 prometheus:prometheus nginx:nginx-light curl:curl
# shellcheck: actionlint (make lint) checks the workflows' run: scripts with it when it is installed.
SYSTEM_COMMANDS += shellcheck:shellcheck
# buildah, mmdebstrap (make images); containerd, runc, the CNI plugins, iptables (the real node, kube-proxy).
SYSTEM_COMMANDS += buildah:buildah mmdebstrap:mmdebstrap containerd:containerd runc:runc
SYSTEM_COMMANDS += /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables

system-packages:  ## Install the Debian packages the node, images, tests and benchmarks need
	@missing=$$(for pair in $(SYSTEM_COMMANDS); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.synced  ## Create .venv from uv.lock

$(VENV)/.synced: uv.lock pyproject.toml operator/pyproject.toml serving/pyproject.toml devstack/pyproject.toml
	@test -x $(UV) || { $(PYTHON) -m venv .cache/bootstrap && .cache/bootstrap/bin/pip install -q uv==$(UV_VERSION); }
	$(UV) sync --frozen
	@touch $@

bench: venv cluster-bin images  ## Side-by-side benchmarks (serving, engine, structured output, LoRA, load, start-up, gateway, wake, cold start, operator); results in bench/results/
	$(PY) -m bench.serving
	$(PY) -m bench.engine
	$(PY) -m bench.structured
	$(PY) -m bench.lora
	$(PY) -m bench.load
	$(PY) -m bench.startup
	$(PY) -m bench.gateway
	$(PY) -m bench.gateway_memory
	$(PY) -m bench.wake
	$(PY) -m bench.cold_start
	$(PY) -m bench.operator_convergence

clean:  ## Remove the virtualenv and local caches in the clone (Go and uv caches stay)
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
