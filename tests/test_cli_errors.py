"""Bad invocations of the `trgrpo` command: each fails with a non-zero exit, no traceback, and a message
that names the offending field or option. Run as subprocesses, all at once, in a few seconds each.

Every one exits 2 with one line "trgrpo <command>: error: ...": our own ConfigError, and the errors
Hydra raises while composing the config (misspelt keys, unknown group options with the choices a user
may make, values of the wrong type, overrides it cannot parse), under every command and under
multirun. `plan` is used wherever it suffices (it loads no model); `train` for the checks a run must
make before it trains anything; `show` for an error raised while building task data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import FAST

OURS = 2  # exit code of every user error (ours and Hydra's compose errors)
SCHEMA = "base_"  # the ConfigStore's schema entries: never offered as choices

# id → (argv after `trgrpo`, exit code, fragments that must all appear in stdout + stderr)
CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "misspelt algo key": (
        ["plan", "algo.clip_lo=0.1"],
        OURS,
        ["algo.clip_lo is not a config key", "did you mean algo.clip_low"],
    ),
    "misspelt trainer key": (
        ["plan", "trainer.stepz=3"],
        OURS,
        ["trainer.stepz is not a config key", "did you mean trainer.steps?"],
    ),
    "misspelt key added with +": (
        ["plan", "+trainer.stepz=3"],
        OURS,
        ["trainer.stepz is not a config key", "trainer.steps"],
    ),
    "misspelt top-level key": (["plan", "tasks=math"], OURS, ["tasks is not a config key", "task?"]),
    "unknown algo": (["plan", "algo=ppo"], OURS, ["algo=ppo: no such algo", "tr_grpo", "dr_grpo"]),
    "unknown task": (["plan", "task=maths"], OURS, ["task=maths: no such task", "logic, math, tool_qa"]),
    "unknown rollout": (["plan", "rollout=sglang"], OURS, ["rollout=sglang: no such rollout", "hf, vllm"]),
    "unknown experiment": (
        ["plan", "experiment=paper_maths"],
        OURS,
        ["experiment=paper_maths: no such experiment", "paper_math", "sweep_cpu"],
    ),
    "type error": (["plan", "trainer.steps=many"], OURS, ["trainer.steps", "'many'", "Integer"]),
    "bool type error": (["plan", "trainer.compile=maybe"], OURS, ["trainer.compile", "'maybe'", "bool"]),
    "unparseable override": (
        ["plan", "trainer.steps=[1"],
        OURS,
        ["cannot parse the override 'trainer.steps=[1'", "override_grammar"],
    ),
    "bare word for plan": (["plan", "outputs/x"], OURS, ["'outputs/x'", "an override is key=value"]),
    "unknown task under show": (["show", "task=maths"], OURS, ["trgrpo show: error: task=maths", "logic"]),
    "type error under eval": (["eval", "trainer.steps=abc"], OURS, ["trgrpo eval: error: trainer.steps"]),
    "empty test split under eval": (  # 1-digit sums: all 100 in the training pool; before a model loads
        ["eval", "task.generators.0.params.min_digits=1", "task.generators.0.params.max_digits=1"],
        OURS,
        ["trgrpo eval: error: task=math: the test split is empty", "task.train_size"],
    ),
    "unknown task under multirun": (
        ["train", "-m", "task=math,maths"],
        OURS,
        [
            "trgrpo train: error: 1 of 2 jobs cannot run",
            "#1 task=maths",
            "no such task",
            "logic, math, tool_qa",
        ],
    ),
    "type error under multirun": (
        ["train", "-m", "trainer.steps=1,abc"],
        OURS,
        ["trgrpo train: error: 1 of 2 jobs cannot run", "#1 trainer.steps=abc: 1 problem", "'abc'"],
    ),
    "eval of a missing run folder": (
        ["eval", "outputs/no/such/run"],
        OURS,
        ["trgrpo eval: error: outputs/no/such/run does not exist", "RUN_DIR|CHECKPOINT"],
    ),
    "eval of a folder without checkpoints": (
        ["eval", "."],  # the positional is eval.checkpoint: the same check as eval.checkpoint=.
        OURS,
        ["trgrpo eval: error: eval.checkpoint='.'", "no model (config.json) or checkpoints/step_N"],
    ),
    "eval checkpoint given twice": (
        ["eval", ".", "eval.checkpoint=."],
        OURS,
        ["the checkpoint is given twice"],
    ),
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
    "negative threads": (["plan", "trainer.threads=-3"], OURS, ["trainer.threads=-3", "auto, a number ≥ 1"]),
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
    "eval of no prompts": (
        ["eval", "eval.size=0", "eval.checkpoint=/nonexistent/ckpt"],
        OURS,
        ["trgrpo eval: error:", "eval.size=0 must be ≥ 1"],
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
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr  # one line
    assert SCHEMA not in errors[0], errors[0]  # schema entries are not offered as choices
    if argv[0] == "train":  # failed before training: no metrics, no checkpoint
        assert not list(cwd.rglob("metrics.jsonl"))
        assert not list(cwd.rglob("checkpoints"))


def _model_row(*overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "trgrpo", "plan", *overrides], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(line for line in proc.stdout.splitlines() if line.strip().startswith("model "))


def test_plan_names_the_model_it_loads(tmp_path):
    """model.path replaces the default tiny preset: plan shows the path, not the word tiny."""
    assert "tiny: built" in _model_row()
    row = _model_row(f"model.path={tmp_path}")
    assert f"{tmp_path} (local folder)" in row and "tiny" not in row, row
    assert "qwen2.5-0.5b-instruct: Qwen/Qwen2.5-0.5B-Instruct (hub id)" in _model_row(
        "model=qwen2.5-0.5b-instruct"
    )


def test_a_task_with_no_held_out_problems_is_a_one_line_error(tmp_path):
    """1-digit addition has 100 distinct problems, all in the 512-problem training pool: the held-out
    split is empty. Refused before a model is built (no traceback at the step-0 evaluation)."""
    args = [
        sys.executable,
        "-m",
        "trgrpo",
        "train",
        *FAST,
        "task.generators.0.params.min_digits=1",
        "task.generators.0.params.max_digits=1",
    ]
    done = subprocess.run([*args, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "no held-out problems are left" in lines[0] and "task.generators" in lines[0]
    assert "Traceback" not in done.stderr
