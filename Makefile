# make demo: install, then run the pipeline on the built-in sample corpus (CPU only).
# make test: install, then run the test suite.
# make lint: install, then ruff (check and format --check) and the import layers (lint-imports).
# torch is pinned to the CPU wheel by default; override for a GPU machine: make test TORCH=torch

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
WORKERS ?= 2   # pytest-xdist processes; each test file runs whole in one of them (--dist loadfile)
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=. $(BIN)/lint-imports

test: install
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh demo_out

bench: install
	$(BIN)/python bench/preprocess.py --workers 2
	$(BIN)/python bench/train.py

clean:
	rm -rf demo_out bench_out .pytest_cache
