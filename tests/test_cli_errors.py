"""Bad invocations of the `trgrpo` command: each fails with a non-zero exit, no traceback, and a message
that names the offending field or option. Run as subprocesses, all at once, in a few seconds each.

Hydra reports misspelt keys, unknown group options and type errors itself (exit 1, naming the key and
listing the available options); our own ConfigError exits 2 with "trgrpo <command>: error: ...".
`plan` is used wherever it suffices (it loads no model); `train` for the checks a run must make
before it trains anything; `show` for an error raised while building task data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HYDRA, OURS = 1, 2  # exit codes: Hydra's compose errors, our ConfigError

# id → (argv after `trgrpo`, exit code, fragments that must all appear in stdout + stderr)
CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "misspelt algo key": (["plan", "algo.clip_lo=0.1"], HYDRA, ["algo.clip_lo", "not in 'AlgoConfig'"]),
    "misspelt trainer key": (["plan", "trainer.step=3"], HYDRA, ["trainer.step", "not in 'TrainerConfig'"]),
    "unknown algo": (["plan", "algo=ppo"], HYDRA, ["algo/ppo", "Available options", "tr_grpo", "dr_grpo"]),
    "unknown task": (["plan", "task=chess"], HYDRA, ["task/chess", "Available options", "tool_qa"]),
    "unknown rollout": (["plan", "rollout=sglang"], HYDRA, ["rollout/sglang", "Available options", "vllm"]),
    "type error": (["plan", "trainer.steps=many"], HYDRA, ["trainer.steps", "'many'", "Integer"]),
    "unknown agg": (
        ["plan", "algo.agg=mean"],
        OURS,
        ["algo.agg='mean'", "token-mean", "seq-mean-token-mean"],
    ),
    "unknown kl estimator": (
        ["plan", "algo.kl_estimator=k4"],
        OURS,
        ["algo.kl_estimator='k4'", "k1, k2, k3"],
    ),
    "unknown tis level": (["plan", "algo.tis=tokens"], OURS, ["algo.tis='tokens'", "token, sequence"]),
    "tis cap below one": (["plan", "algo.tis=token", "algo.tis_cap=0.5"], OURS, ["algo.tis_cap=0.5"]),
    "unknown precision": (["plan", "trainer.precision=fp16"], OURS, ["trainer.precision='fp16'", "bf16"]),
    "unknown weight shape": (
        ["plan", "algo.weights.shape=cubic"],
        OURS,
        ["algo.weights.shape='cubic'", "sigmoid"],
    ),
    "unknown placement": (
        ["plan", "algo.weights.placement=logits"],
        OURS,
        ["algo.weights.placement='logits'"],
    ),
    "unknown dtype": (["plan", "model.dtype=int8"], OURS, ["model.dtype='int8'", "bfloat16"]),
    "group of one": (["plan", "rollout.group_size=1"], OURS, ["rollout.group_size=1", "at least 2"]),
    "no prompts": (["plan", "trainer.prompts_per_step=0"], OURS, ["trainer.prompts_per_step=0"]),
    "negative lr": (["plan", "trainer.lr=-1"], OURS, ["trainer.lr=-1.0 must be > 0"]),
    "top_p above 1": (["plan", "rollout.top_p=1.5"], OURS, ["rollout.top_p=1.5", "(0, 1]"]),
    "clip_low above 1": (["plan", "algo.clip_low=1.2"], OURS, ["algo.clip_low=1.2 must be < 1"]),
    "zero temperature": (["plan", "rollout.temperature=0"], OURS, ["rollout.temperature=0.0 must be > 0"]),
    "minibatches split groups": (
        ["plan", "trainer.prompts_per_step=10", "trainer.minibatches=3"],
        OURS,
        ["trainer.prompts_per_step=10", "trainer.minibatches=3"],
    ),
    "pass@k beyond n": (["plan", "eval.ks=[16]", "eval.n=8"], OURS, ["eval.ks=[16]", "eval.n=8"]),
    "negative sigmoid alpha": (
        ["plan", "algo.weights.alpha=-1"],
        OURS,
        ["algo.weights.alpha=-1.0 must be > 0"],
    ),
    "several problems at once": (
        ["plan", "trainer.keep_last=-1", "eval.size=0"],
        OURS,
        ["trainer.keep_last=-1", "eval.size=0"],
    ),
    "schema without a preset": (["plan", "algo=base_algo"], OURS, ["algo.name has no value"]),
    "missing model path": (
        ["train", "model.path=/nonexistent/model", "trainer.steps=1"],
        OURS,
        ["trgrpo train: error:", "model.path='/nonexistent/model' does not exist"],
    ),
    "missing resume path": (
        ["train", "trainer.resume=/nonexistent/ckpt", "trainer.steps=1"],
        OURS,
        ["trgrpo train: error:", "trainer.resume='/nonexistent/ckpt' does not exist"],
    ),
    "missing dataset file": (
        ["show", "task.dataset=/nonexistent.jsonl"],
        OURS,
        ["trgrpo show: error:", "task.dataset='/nonexistent.jsonl'"],
    ),
    "unknown subcommand": (["fly"], OURS, ["unknown command 'fly'", "train", "plan"]),
}


def _run(case: str, root: Path) -> subprocess.CompletedProcess:
    cwd = root / case.replace(" ", "_")  # train writes a Hydra run dir: keep each case apart
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["TRGRPO_CACHE"] = str(root / "cache")  # never build into ~/.cache, should a case get that far
    return subprocess.run(
        [sys.executable, "-m", "trgrpo", *CASES[case][0]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(max_workers=max(2, min(6, os.cpu_count() or 2))) as pool:
        done = dict(zip(CASES, pool.map(lambda case: _run(case, root), CASES)))
    return {case: (proc, root / case.replace(" ", "_")) for case, proc in done.items()}


def test_enough_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_bad_invocation_fails_cleanly(case, results):
    proc, cwd = results[case]
    argv, code, fragments = CASES[case]
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    if code == OURS:
        assert "error:" in proc.stderr
    if argv[0] == "train":  # failed before training: no metrics, no checkpoint
        assert not list(cwd.rglob("metrics.jsonl"))
        assert not list(cwd.rglob("checkpoints"))
