# marlin: every target does its own set-up (creates .venv and installs on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-full lint format bench gpu-check mar-demo uda-demo sweep-demo clean clean-logs help

help:
	@echo "make train       # default run: python -m src.train (ARGS='key=value ...' for overrides)"
	@echo "make test        # test suite (CI); make test-full also runs tests marked slow"
	@echo "make lint        # ruff check + format check;  make format  # apply ruff format"
	@echo "make bench       # benchmarks -> docs/benchmarks.md"
	@echo "make gpu-check   # GPU tests + GPU throughput/sync checks -> docs/benchmarks.md (skips without CUDA)"
	@echo "make mar-demo    # MAR stage 1 + stage 2 on the synthetic A->B benchmark"
	@echo "make uda-demo    # direct transfer, MAR, cluster contrast, supervised on B (synthetic A->B)"
	@echo "make sweep-demo  # margin x mining-ratio multirun + summary table/plot"
	@echo "make clean-logs  # delete logs/ (runs, checkpoints, sweeps)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) -m src.train $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

test-full: install
	$(PY) -m pytest -m "" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m src.bench $(ARGS)

gpu-check: install
	$(PY) -m src.bench.gpu_check $(ARGS)

mar-demo: install
	$(PY) -m src.tools.mar_demo $(ARGS)

uda-demo: install
	$(PY) -m src.tools.uda_demo $(ARGS)

sweep-demo: install
	$(PY) -m src.tools.sweep_demo $(ARGS)

clean:
	rm -rf logs .pytest_cache .ruff_cache

clean-logs:  # every run folder, checkpoint and sweep under logs/ (the data stays)
	rm -rf logs
