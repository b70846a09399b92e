"""`trgrpo eval` end to end on the fast tiny model: a run directory resolves to its newest checkpoint,
eval.json holds greedy accuracy, avg@n and pass@k with CIs and a by-level breakdown that agree with
the per-sample rows in eval_samples.jsonl; bad checkpoints are clear errors. `trgrpo eval RUN_DIR` takes the run positionally (as `report` does)
or as eval.checkpoint=<dir>."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
from conftest import FAST, make_cfg

from trgrpo.config.schema import ConfigError
from trgrpo.evaluate import resolve_model_path, run_eval
from trgrpo.report.stats import pass_at_k
from trgrpo.train import run

SIZE, N = 8, 4


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A run directory with checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("run")
    run(make_cfg(*FAST, "trainer.steps=2", "trainer.save_every=1", "trainer.keep_last=0"), run_dir)
    return run_dir


def test_a_run_directory_resolves_to_its_newest_checkpoint(trained):
    assert resolve_model_path(str(trained)).endswith("step_2")
    assert resolve_model_path(str(trained / "checkpoints" / "step_1")).endswith("step_1")
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"  # a hub id, untouched
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path("/no/such/folder")
    with pytest.raises(ConfigError, match="no model"):
        resolve_model_path(str(trained / ".hydra"))


def test_eval_summary_agrees_with_its_samples(trained, tmp_path):
    cfg = make_cfg(*FAST, f"eval.checkpoint={trained}", f"eval.size={SIZE}", f"eval.n={N}", "eval.ks=[1,2,4]")
    summary = run_eval(cfg, tmp_path)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["model"].endswith("step_2") and record["metrics"] == json.loads(json.dumps(summary))
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r["kind"] == "greedy"]
    sampled = defaultdict(list)
    for r in rows:
        if r["kind"] == "sample":
            sampled[r["id"]].append(r["correct"])
    assert len(greedy) == SIZE and len(sampled) == SIZE and all(len(v) == N for v in sampled.values())
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in greedy) / SIZE)
    counts = [sum(v) for v in sampled.values()]
    assert summary[f"avg@{N}"] == pytest.approx(sum(counts) / (SIZE * N))
    for k in (1, 2, 4):
        expected = sum(pass_at_k(N, c, k) for c in counts) / SIZE
        assert summary[f"pass@{k}"] == pytest.approx(expected)
        lo, hi = summary[f"pass@{k}_ci"]
        assert lo <= summary[f"pass@{k}"] <= hi
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
    assert summary["by_level"], "no difficulty breakdown"


def test_trgrpo_eval_command_writes_its_files(trained, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable, "-m", "trgrpo", "eval", str(trained), *FAST, "eval.size=4",
            "eval.n=2", "eval.ks=[1,2]", f"hydra.run.dir={out}",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "eval.json").exists() and (out / "eval_samples.jsonl").exists()
    assert "pass@2" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "trgrpo", "eval", *FAST, "eval.checkpoint=/no/such/ckpt"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # its Hydra run dir goes there
    )  # fmt: skip
    assert bad.returncode == 2 and "eval.checkpoint='/no/such/ckpt' does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
