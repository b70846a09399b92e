"""End to end: every algo preset trains two steps on the tiny model; runs are deterministic under a seed;
a model saved to a folder loads through model.path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, FAST_ANY_TASK, make_cfg

from trgrpo.config.schema import ConfigError
from trgrpo.models.load import load_policy
from trgrpo.models.tiny import build_tiny
from trgrpo.train import run

ALGOS = ["grpo", "tr_grpo", "dr_grpo", "dapo", "ar", "tr_grpo_reverse", "tr_grpo_norm"]
REQUIRED = [
    "reward/mean",
    "reward/std",
    "train/grad_norm",
    "loss/policy",
    "loss/kl",
    "train/entropy",
    "train/clip_frac_low",
    "train/clip_frac_high",
    "weights/mean",
    "weights/std",
    "weights/min",
    "weights/max",
    "rollout/response_len",
    "rollout/zero_adv_groups",
    "time/generate",
    "time/update",
    "time/step",
    "perf/tokens_per_s",
]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _initial_weights(cfg):
    model, _ = load_policy(cfg.model, cfg.task, seed=cfg.seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("algo", ALGOS)
def test_two_steps_change_parameters_with_finite_metrics(algo, tmp_path):
    cfg = make_cfg(*FAST, f"algo={algo}", "trainer.steps=2", "trainer.lr=1e-3")
    before = _initial_weights(cfg)
    run(cfg, tmp_path)
    rows = _read(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in REQUIRED:
            assert key in row, key
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row[key])
        if algo == "tr_grpo_norm":  # the logged weights are normalised; the raw scale is logged too
            assert row["weights/mean"] == pytest.approx(1.0, abs=1e-6) and row["weights/raw_mean"] > 1.0
    assert any(k.startswith("eval/math/") for k in rows[-1])
    after, _ = load_policy(cfg.model.__class__(path=str(tmp_path / "checkpoints" / "step_2")), cfg.task)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed after two optimizer steps"
    status = json.loads((tmp_path / "run.json").read_text())
    assert status["status"] == "finished" and status["algo"] == algo
    assert (tmp_path / "eval.json").exists() and (tmp_path / ".hydra" / "config.yaml").exists()
    samples = _read(tmp_path / "samples.jsonl")
    assert samples and {"prompt", "response", "reward", "answer"} <= set(samples[0])


def test_same_seed_same_metrics(tmp_path):
    overrides = (*FAST, "trainer.steps=2", "trainer.lr=1e-3", "algo=tr_grpo")
    runs = []
    for name in ("a", "b"):
        run(make_cfg(*overrides), tmp_path / name)
        rows = _read(tmp_path / name / "metrics.jsonl")
        runs.append([{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows])
    assert runs[0] == runs[1]
    other = tmp_path / "c"
    run(make_cfg(*overrides, "seed=1"), other)
    rows = [
        {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}
        for r in _read(other / "metrics.jsonl")
    ]
    assert rows != runs[0]


def test_model_path_loads_a_saved_folder(tmp_path):
    cfg = make_cfg(*FAST)
    source = build_tiny(cfg.model.tiny, cfg.task, seed=0)
    model, tokenizer = load_policy(cfg.model, cfg.task)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg2 = make_cfg(*FAST, f"model.path={folder}", "model.name=local", "trainer.steps=1")
    loaded, tok2 = load_policy(cfg2.model, cfg2.task)
    assert tok2.encode("12 + 3") == tokenizer.encode("12 + 3")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    run(cfg2, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "config.json").exists()
    assert source.exists()


def test_missing_model_path_is_a_clear_error(tmp_path):
    cfg = make_cfg(*FAST, "model.path=/nonexistent/model-dir")
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_policy(cfg.model, cfg.task)


@pytest.mark.parametrize("task", ["logic", "tool_qa"])
def test_other_tasks_train_end_to_end(task, tmp_path):
    """logic (single turn) and tool_qa (multi-turn through the agent loop) through the whole loop."""
    cfg = make_cfg(
        *FAST_ANY_TASK, f"task={task}", "trainer.steps=1", "trainer.lr=1e-3", "rollout.max_new_tokens=24"
    )
    run(cfg, tmp_path)
    rows = _read(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and math.isfinite(rows[0]["loss/policy"])
    assert any(k.startswith(f"eval/{task}/") for k in rows[-1])
    if task == "tool_qa":
        assert "rollout/searches" in rows[0] and "rollout/turns" in rows[0]


def test_ppo_epochs_and_minibatches_recompute_old_logprobs(tmp_path):
    cfg = make_cfg(
        *FAST, "trainer.steps=1", "trainer.ppo_epochs=2", "trainer.minibatches=2", "trainer.lr=1e-3"
    )
    run(cfg, tmp_path)
    row = _read(tmp_path / "metrics.jsonl")[0]
    # Later optimizer steps of the same batch see a moved policy: the ratio leaves 1.
    assert row["train/approx_kl_old"] > 0.0
    assert math.isfinite(row["train/grad_norm"])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_sampling_runs_and_logs(level, tmp_path):
    """The hf engine's sampler log-probs are the learner's up to float noise, so c ≈ 1."""
    run(make_cfg(*FAST, "trainer.steps=1", f"algo.tis={level}", "algo.tis_cap=2"), tmp_path)
    row = _read(tmp_path / "metrics.jsonl")[0]
    assert abs(row["train/tis_mean"] - 1.0) < 1e-3
    assert math.isfinite(row["train/grad_norm"])


def test_literal_tau_gives_constant_weights_and_a_warning(tmp_path, caplog):
    cfg = make_cfg(*FAST, "algo=tr_grpo", "algo.weights.tau=9", "trainer.steps=1")
    with caplog.at_level("WARNING", logger="trgrpo"):
        run(cfg, tmp_path)
    row = _read(tmp_path / "metrics.jsonl")[0]
    assert row["weights/constant"] == 1.0 and row["weights/mean"] == 1.0
    assert "token weights are constant" in caplog.text


def test_multirun_sweeps_algos_and_seeds(tmp_path):
    """`trgrpo train -m algo=grpo,tr_grpo seed=0,1` runs four jobs, each with its own run directory."""
    import os
    import subprocess
    import sys

    args = [
        sys.executable,
        "-m",
        "trgrpo",
        "train",
        "-m",
        "algo=grpo,tr_grpo",
        "seed=0,1",
        "trainer.steps=1",
        *FAST,
        f"hydra.sweep.dir={tmp_path}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/run.json"))
    assert len(runs) == 4
    names = {
        (json.loads((r / "run.json").read_text())["algo"], json.loads((r / "run.json").read_text())["seed"])
        for r in runs
    }
    assert names == {("grpo", 0), ("grpo", 1), ("tr_grpo", 0), ("tr_grpo", 1)}


def test_wandb_offline_mirrors_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(*FAST, "logger=wandb", "trainer.steps=1")
    run(cfg, tmp_path)
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline, "wandb wrote no offline run"
    assert list(offline[0].glob("*.wandb")), "the offline run holds no data file"
    assert (tmp_path / "metrics.jsonl").exists()  # JSONL is always written


def test_eval_at_start_logs_step_zero_without_changing_training(tmp_path):
    """trainer.eval_at_start: the initial policy's eval is logged as step 0; it draws from no RNG the
    training uses, so the training steps are the same with and without it."""
    overrides = (*FAST, "trainer.steps=2", "trainer.eval_every=1", "trainer.lr=1e-3")
    rows = {}
    for flag in ("true", "false"):
        run(make_cfg(*overrides, f"trainer.eval_at_start={flag}"), tmp_path / flag)
        rows[flag] = _read(tmp_path / flag / "metrics.jsonl")
    first = rows["true"][0]
    assert first["step"] == 0 and "eval/math/accuracy" in first and "reward/mean" not in first
    assert [r["step"] for r in rows["false"]] == [1, 2]

    def strip(r):
        return {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}

    assert [strip(r) for r in rows["true"][1:]] == [strip(r) for r in rows["false"]]
