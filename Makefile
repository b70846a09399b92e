# The command index. Every target creates .venv on first use (torch 2.13.0 CPU first, so no CUDA
# build is ever pulled in), then runs inside it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install install-vllm test test-fast lint format train sweep eval report bench tiny clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check trgrpo tests scripts
	$(VENV)/bin/ruff format --check trgrpo tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format trgrpo tests scripts
	$(VENV)/bin/ruff check --fix trgrpo tests scripts

train: $(STAMP)
	$(VENV)/bin/trgrpo train $(ARGS)

sweep: $(STAMP)
	$(VENV)/bin/trgrpo train -m experiment=sweep_cpu $(ARGS)

eval: $(STAMP)
	$(VENV)/bin/trgrpo eval $(ARGS)

report: $(STAMP)
	$(VENV)/bin/trgrpo report multirun $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

tiny: $(STAMP)
	$(VENV)/bin/trgrpo build-tiny $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
