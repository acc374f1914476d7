# toolmesh — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TOOLMESH_CACHE ?= $(HOME)/.cache/toolmesh
PYTEST_ARGS ?=

.PHONY: help install demo test test-pods test-fast lint crds docs chart-schema node-deps conformance-deps cluster-bins system-deps bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/' | expand -t 20

$(BIN)/toolmesh: pyproject.toml constraints.txt
	@echo "==> creating $(VENV) and installing toolmesh (editable) with pinned dependencies"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(BIN)/toolmesh  ## create .venv and install toolmesh with its pinned dependencies

demo: install node-deps  ## install, `toolmesh up examples/quickstart/`, real tool calls through the gateway, clean stop
	@bash scripts/demo.sh

system-deps:  ## Debian packages the tests and benchmarks use
	@bash scripts/system-deps.sh

node-deps:  ## npm packages: reference MCP servers, Node 22 and the conformance suite
	@bash scripts/node-deps.sh

cluster-bins:  ## build (once, cached by go.mod hash) etcd, kube-*, kubectl, kwok, helm; kubelet, kube-proxy, CoreDNS, pause
	@bash tests/cluster/build.sh
	@bash tests/pods/build.sh

lint: install  ## import-direction contracts, read from the component roots
	PYTHONPATH=api:operator:sidecar:registry:cli $(BIN)/lint-imports

crds: install  ## regenerate crds/ from the api models
	rm -f crds/*.yaml && $(BIN)/toolmesh crds --out crds && cp crds/*.yaml charts/toolmesh/crds/

docs: install  ## regenerate docs/policy-reference.md from the policy models' docstrings
	$(BIN)/python scripts/policy_reference.py

chart-schema: install  ## regenerate charts/toolmesh/values.schema.json from values.yaml's comments and defaults
	$(BIN)/python scripts/values_schema.py

test: install system-deps node-deps cluster-bins lint  ## install everything the tests need, run the whole suite
	$(BIN)/pytest $(PYTEST_ARGS)

test-pods: install system-deps node-deps cluster-bins  ## only the real-node tier: the image, the chart and real pods (root)
	$(BIN)/pytest tests/pods $(PYTEST_ARGS)

test-fast: install cluster-bins lint  ## unit tests only (the chart tests use the helm binary)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: install system-deps node-deps  ## run the benchmark harness, write bench/results/ (BENCH_ARGS="--quick sidecar")
	@bash bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
