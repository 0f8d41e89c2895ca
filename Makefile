# llmep: the two commands are `make demo` (the whole loop) and `make test` (every tier).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
CRD_ROOT ?= $(CURDIR)
PYTEST_ARGS ?=

.PHONY: help setup venv rig-build docker images kind-node-image crds docs check-crds lint test test-unit test-contract test-cluster \
        test-serving test-reliability test-e2e bench demo clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: venv rig-build docker images kind-node-image ## install everything the tests need (venv, Go-built binaries, Docker, images, kind node image)

venv: ## create .venv from the pinned lock (idempotent)
	hack/setup-venv

rig-build: ## build the pinned control-plane binaries from Go modules into the cache (idempotent)
	hack/local-cluster build

# Exit 3 of hack/docker-engine: no Docker can be had here at all; setup goes on and the e2e
# tier skips, saying so.
docker: ## a working Docker engine: use one, or install Debian's docker.io and start dockerd (root)
	@hack/docker-engine; rc=$$?; if [ $$rc = 3 ]; then echo "make setup: no Docker engine here: images and the e2e tier are skipped"; else exit $$rc; fi

images: docker rig-build ## build llmep's images offline (llmep, serving-cpu, KubeRay operator) (idempotent)
	@if hack/docker-engine check; then hack/images; else echo "make images: no Docker engine, skipped"; fi

kind-node-image: docker rig-build ## build kind's node image offline at the rig's Kubernetes version (idempotent)
	@if hack/docker-engine check; then hack/kind-node-image; else echo "make kind-node-image: no Docker engine, skipped"; fi

crds: ## regenerate crds/, the chart's CRD and docs/api.md from the pydantic models
	$(PY) -m llmep_operator.api.crdgen
	$(PY) -m llmep_operator.api.docgen

docs: crds ## regenerate generated docs (docs/api.md)

check-crds: ## fail when the generated CRD files are stale
	$(PY) -m llmep_operator.api.crdgen --check --root $(CRD_ROOT)
	$(PY) -m llmep_operator.api.docgen --check

lint: ## ruff, import-linter (operator and gateway never import ray or vllm), mypy --strict
	$(VENV)/bin/ruff check operator serving tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --scripts-are-modules hack/local-cluster hack/runc-capfilter

test: check-crds lint ## lint, then every tier that can run here; fails if a tier collected nothing
	$(PY) -m pytest tests --durations=20 $(PYTEST_ARGS)

test-unit: ## unit tier only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-contract: ## contract tier only
	$(PY) -m pytest tests/contract $(PYTEST_ARGS)

test-cluster: ## cluster tier only (starts the local control plane unless KUBECONFIG is set)
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

test-serving: ## serving tier only (real Ray + vLLM CPU build)
	$(PY) -m pytest tests/serving $(PYTEST_ARGS)

test-reliability: ## reliability tier only
	$(PY) -m pytest tests/reliability $(PYTEST_ARGS)

test-e2e: ## end-to-end tier on kind with the images built here (LLMEP_KEEP_KIND=1 keeps the cluster)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: ## benchmarks: print ratios against baselines measured in the same run
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: setup ## the whole loop on this machine (see README)
	hack/demo

clean: ## remove local build outputs (not the caches outside the tree)
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
