"""`scripts/gpu_check.sh --cpu`: the prepared GPU check's dry run. Every section of the check runs at
tiny sizes on the CPU (gloo for FSDP2), so the script a GPU machine runs cannot rot unnoticed; here
every number it reports must be present and finite (~35 s on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {
    "probe": ["bf16_tflops", "fp32_tflops"],
    "tests": ["files", "passed", "skipped", "failed"],
    "model": ["params", "layers", "vocab"],
    "generation": ["tokens_per_s", "tokens_per_call", "call_s"],
    "learner": ["tokens_per_step", "model_tflop_per_step", "padding_free_speedup"],
    "train": ["time_update_s", "time_generate_s", "tokens_per_s", "learner_response_tokens_per_s"],
    "fsdp": ["backend", "world_size", "time_update_s", "learner_response_tokens_per_s"],
}


def numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_the_dry_run_reports_every_number(tmp_path):
    out = tmp_path / "out"
    args = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)]
    args += ["--work", str(tmp_path / "work")]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    results = json.loads((out / "gpu_check.json").read_text())
    assert results["failed_sections"] == [], results["failed_sections"]
    for section, keys in REQUIRED.items():
        missing = [k for k in keys if k not in results[section]]
        assert not missing, (section, missing)
    for variant in ("padded", "padding_free"):
        v = results["learner"][variant]
        assert v["tokens_per_s"] > 0 and v["mfu"] > 0 and math.isfinite(v["loss_policy"]), v
    assert results["tests"]["files"] >= 1 and results["tests"]["skipped"] >= 1  # collected; no CUDA here
    assert results["fsdp"]["backend"] == "gloo" and results["fsdp"]["world_size"] == 1
    assert results["environment"]["mode"] == "cpu"
    assert all(math.isfinite(x) for x in numbers(results)), results
    for label in ("matmul bf16 / fp32 TFLOP/s", "generation tokens/s", "learner padded", "MFU"):
        assert label in done.stdout, label
    assert "padding-free / padded speed" in done.stdout and "fsdp (gloo, 1 rank)" in done.stdout
    table = (out / "gpu_check.md").read_text().splitlines()
    assert table[0] == "| measurement | value |" and len(table) > 10
