# Entry points, kubebuilder-style. Everything heavy is cached outside the checkout
# (under $(GFT_CACHE)), so a second run on the same machine is fast.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
GFT_CACHE ?= $(HOME)/.cache/gemma-finetune
export GFT_CACHE
export UV_CACHE_DIR := $(GFT_CACHE)/uv-cache
UV_VERSION := 0.13.9
UV := $(GFT_CACHE)/uv-$(UV_VERSION)/bin/uv
VENV := .venv
# The venv is rebuilt whenever the lock or the project's metadata changes.
VENV_STAMP := $(VENV)/.stamp-$(shell cat requirements.lock pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
PY := $(VENV)/bin/python
PG := $(PY) -m devcluster
export PYTHONPATH := $(CURDIR):$(CURDIR)/tests

.PHONY: help venv lock lint test test-notebook test-fast bench-gpu gpu-kit demo cluster-up cluster-down tools system-deps manifests vendor

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(GFT_CACHE)/uv-$(UV_VERSION)
	$(GFT_CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

$(VENV_STAMP): requirements.lock pyproject.toml | $(UV)
	rm -rf $(VENV)
	$(UV) venv -q --python $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q -r requirements.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q --no-deps -e .
	touch $@

venv: $(VENV_STAMP) ## the Python environment (operator, trainer, dev tools)

IMAGE_LOCK := $(UV) pip compile -q pyproject.toml --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes

# The trainer image's torch: PyPI's, the CUDA 13.2 build (NVIDIA driver 580.65.06 or newer). For
# nodes with older drivers, `make lock TRAINER_TORCH_BACKEND=cu126` locks PyTorch's own build for
# CUDA 12.6 (driver 525.60.13 or newer) through uv's --torch-backend.
TRAINER_TORCH_BACKEND ?=

lock: | $(UV) ## re-resolve the locks from pyproject.toml (dev venv, operator image, trainer image)
	$(UV) pip compile -q pyproject.toml --extra operator --extra trainer --extra client --extra dev \
		--python-version 3.11 -o requirements.lock
	$(IMAGE_LOCK) --extra operator -o operator/requirements.lock
	$(IMAGE_LOCK) --extra trainer --extra qlora --extra hub-datasets \
		$(if $(TRAINER_TORCH_BACKEND),--torch-backend $(TRAINER_TORCH_BACKEND)) \
		-o trainer-image/requirements.lock

manifests: venv tools ## render the CRD template from the API model, and manifests/ from the chart
	$(PY) -m chart.render --write

UPLOT_VERSION := 1.6.32
vendor: ## fetch the dashboard's one charting library (uPlot) from npm again, into static/vendor/uplot
	work="$$(mktemp -d)" && cd "$$work" && npm pack -q uplot@$(UPLOT_VERSION) >/dev/null && \
		tar xzf uplot-$(UPLOT_VERSION).tgz && \
		cp package/dist/uPlot.esm.js package/dist/uPlot.min.css package/LICENSE \
			$(CURDIR)/operator/gft_dashboard/static/vendor/uplot/ && rm -rf "$$work"

system-deps: ## Debian packages the tests need: the proving ground's, Prometheus, Chromium (only when missing)
	@missing=""; for t in openssl:openssl ip:iproute2 unshare:util-linux \
		prometheus:prometheus chromium:chromium; do \
		command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; fi

tools: venv system-deps ## build (once, cached) the control plane, etcd and KWOK
	$(PG) build

lint: venv ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Three sessions at once: the proving-ground tests in two shares, each on its own proving
# ground (tests/conftest.py splits them: GFT_TEST_SHARD), and beside them every other test. The
# others' reports follow the first's. The operator share's KWOK pods take the other half of
# RFC 2544's range (each proving ground routes its own as unreachable).
test: venv tools ## set up everything and run the whole suite (what CI runs)
	$(VENV)/bin/ruff check .
	@rest_log=$$(mktemp); operator_log=$$(mktemp); \
	$(VENV)/bin/pytest -m "not cluster" -p no:cacheprovider --durations=15 >$$rest_log 2>&1 & \
	rest=$$!; \
	GFT_TEST_SHARD=operator GFT_KWOK_POD_CIDR=198.19.0.0/16 $(VENV)/bin/pytest \
		-m "cluster and not notebook" -p no:cacheprovider --durations=20 >$$operator_log 2>&1 & \
	operator=$$!; \
	trap 'kill $$rest $$operator 2>/dev/null; rm -f $$rest_log $$operator_log' INT TERM; \
	GFT_TEST_SHARD=main $(VENV)/bin/pytest -m "cluster and not notebook" --durations=20 \
		&& cluster=0 || cluster=$$?; \
	wait $$operator && operator=0 || operator=$$?; \
	echo "=== the operator's proving-ground tests (run beside the ones above) ==="; \
	cat $$operator_log; rm -f $$operator_log; \
	wait $$rest && other=0 || other=$$?; \
	echo "=== the tests without the proving ground (run beside the ones above) ==="; \
	cat $$rest_log; rm -f $$rest_log; \
	echo "make test: proving-ground tests exit $$cluster and $$operator, the others exit $$other"; \
	test $$cluster -eq 0 -a $$operator -eq 0 -a $$other -eq 0

test-notebook: venv tools ## run the example notebook (the real Gemma 3 270M through the Python client) on the proving ground
	$(VENV)/bin/pytest -m notebook

test-fast: venv ## the suite without the slow end-to-end tests
	$(VENV)/bin/pytest -m "not slow"

bench-gpu: venv ## on a CUDA machine: the trainer's GPU throughput table and the gpu-marked tests, in one go
	$(PY) -m benchmarks.trainer_gpu --steps 20 --seq 2048 --batch 1
	$(VENV)/bin/pytest -m gpu tests/trainer

gpu-kit: venv ## the wheels a lent GPU machine needs (CPython 3.12 x86-64, not torch), into .whl/ (< 64 MiB)
	$(PY) -m benchmarks.gpu_kit build .whl --uv $(UV) --pip $(GFT_CACHE)/uv-$(UV_VERSION)/bin/pip

cluster-up: venv tools ## start the proving ground (or reuse a running one); the last line printed is the kubeconfig path
	$(PG) up

cluster-down: venv ## stop the proving ground and remove its state
	$(PG) down

demo: venv tools ## fine-tune the real Gemma 3 270M through the operator on the proving ground (left up)
	$(PG) demo
