# make demo: set up .venv, then shards → SimCLR pretraining → export → k-NN on real CIFAR-10.
# make test: set up .venv, then the test suite. Both are idempotent (set-up runs once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Torch pinned for this project's machines; pyproject.toml keeps ranges for cluster users.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

DATA ?= ../shared/data/cifar10
WORK ?= work/demo
DEMO_STEPS ?= 130
DEMO_BATCH ?= 64
KNN_TRAIN ?= 10000
KNN_TEST ?= 5000
PYTEST_ARGS ?= --durations=15

.PHONY: setup demo test lint format clean slurm-up slurm-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,deepspeed,slurm]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	DATA="$(DATA)" WORK="$(WORK)" STEPS="$(DEMO_STEPS)" BATCH="$(DEMO_BATCH)" \
	KNN_TRAIN="$(KNN_TRAIN)" KNN_TEST="$(KNN_TEST)" PY="$(PY)" bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# A single-node Slurm on this machine (installs slurm-wlm + munge when missing; needs root).
slurm-up:
	bash slurm/local/up.sh

slurm-down:
	bash slurm/local/down.sh

lint: setup
	$(PY) -m ruff check pretrain data_prep eval tests slurm
	$(PY) -m ruff format --check pretrain data_prep eval tests slurm

format: setup
	$(PY) -m ruff format pretrain data_prep eval tests slurm

clean:
	rm -rf $(WORK) .pytest_cache
