"""Exact resume: a `trgrpo train` killed with SIGKILL and resumed with trainer.resume=auto logs exactly
what an uninterrupted run with the same seed logs (every non-time metric, bit for bit, no duplicate or
torn rows); half-written checkpoints are never picked up; a config that changes the math is refused,
naming the keys, unless trainer.resume_force=true; trainer_state.pt loads with weights_only=True, so one
holding a pickled object is refused without running it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST, make_cfg

from trgrpo.config.schema import ConfigError
from trgrpo.run import checkpoint
from trgrpo.train import run

STEPS = 8
RUN = (*FAST, f"trainer.steps={STEPS}")  # the run every resume test must reproduce
_REFERENCE: dict[str, list[dict]] = {}


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock keys (every line must be whole JSON)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def assert_same_rows(actual: list[dict], expected: list[dict]) -> None:
    """Equal row for row (floats bit for bit); the message names the first differing keys."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected):
        diff = {k: (got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k)}
        assert not diff, f"step {got['step']}: (resumed, uninterrupted) = {diff}"


def reference_rows(root: Path) -> list[dict]:
    """The metrics of an uninterrupted run of RUN (trained in this process once per session)."""
    if "rows" not in _REFERENCE:
        run(make_cfg(*RUN), root / "reference")
        _REFERENCE["rows"] = comparable(root / "reference")
    return _REFERENCE["rows"]


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """`trgrpo train` on RUN in the background; SIGINT restored (a background shell may ignore it).
    Its console output goes to `proc.console` (a file beside the run directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"console-{time.monotonic_ns()}.txt"
    with path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trgrpo", "train", *RUN, *overrides, f"hydra.run.dir={run_dir}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    proc.console = path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the process; its console output."""
    proc.wait(timeout=timeout)
    return proc.console.read_text()  # type: ignore[attr-defined]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Poll metrics.jsonl until a whole row of step ≥ `step` is there (fails if the run ends first)."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{finish(proc)[-3000:]}"
        whole = path.read_text().split("\n")[:-1] if path.exists() else []
        if any(json.loads(line)["step"] >= step for line in whole):
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigkill_then_resume_logs_what_an_uninterrupted_run_logs(tiny, tmp_path, tmp_path_factory):
    reference = reference_rows(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, "trainer.save_every=2")
    wait_for_step(proc, run_dir, 3)
    proc.kill()
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    killed_at = comparable(run_dir)[-1]["step"]
    assert killed_at < STEPS, "the run finished before it was killed: nothing was tested"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    # What a kill in the middle of a write leaves, and checkpoints that must not be picked up.
    for name in ("metrics.jsonl", "samples.jsonl"):
        with (run_dir / name).open("a") as f:
            f.write('{"step": 99, "reward/me')
    ckpts = run_dir / "checkpoints"
    (ckpts / ".tmp-step_7-x").mkdir()
    (ckpts / ".tmp-step_7-x" / checkpoint.STATE_FILE).write_text("half")
    for step in (7, STEPS):  # a step folder without trainer_state.pt is incomplete
        (ckpts / f"step_{step}").mkdir()
        (ckpts / f"step_{step}" / "config.json").write_text("{}")

    resumed = start_train(run_dir, "trainer.save_every=2", "trainer.resume=auto")
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    status = json.loads((run_dir / "run.json").read_text())
    resumed_from = Path(status["resumed_from"])
    assert status["status"] == "finished" and resumed_from.parent == ckpts
    assert resumed_from.name in ("step_2", "step_4") and int(resumed_from.name[5:]) <= killed_at
    assert_same_rows(comparable(run_dir), reference)  # bit-exact, each step once, in order
    samples = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert Counter(samples) == dict.fromkeys(range(1, STEPS + 1), 4)
    assert checkpoint.load_state(ckpts / f"step_{STEPS}")["step"] == STEPS  # replaced the incomplete one
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("step_2", ".tmp-step_4-abc", "step_6"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "model.safetensors").write_text("")
    for name in ("step_2", ".tmp-step_4-abc"):
        (ckpts / name / checkpoint.STATE_FILE).write_text("")
    assert checkpoint.find_resume("auto", tmp_path) == ckpts / "step_2"
    assert checkpoint.find_resume(str(tmp_path), tmp_path / "elsewhere") == ckpts / "step_2"
    with pytest.raises(ConfigError, match="no checkpoint there"):
        checkpoint.find_resume(str(ckpts / "step_6"), tmp_path)
    assert checkpoint.find_resume("auto", tmp_path / "empty") is None
    assert checkpoint.find_resume(None, tmp_path) is None


def test_config_changes_that_alter_the_math():
    base = dataclasses.asdict(make_cfg(*FAST))
    harmless = dataclasses.asdict(
        make_cfg(
            *FAST,
            "trainer.steps=999",
            "trainer.save_every=5",
            "trainer.eval_every=3",
            "trainer.max_tokens_per_microbatch=100",
            "rollout.batch_size=2",
            "task.eval_size=16",
            "logger.console=true",
            "trainer.resume=auto",
        )
    )
    assert checkpoint.config_changes(base, harmless) == {}
    changed = dataclasses.asdict(
        make_cfg(
            *FAST,
            "seed=3",
            "algo=grpo",
            "trainer.lr=0.5",
            "trainer.minibatches=2",
            "task.data_seed=7",
            "model.tiny.layers=3",
            "rollout.temperature=0.7",
        )
    )
    diff = checkpoint.config_changes(base, changed)
    for key in (
        "seed",
        "algo.name",
        "algo.weights.shape",
        "trainer.lr",
        "trainer.minibatches",
        "task.data_seed",
        "model.tiny.layers",
        "rollout.temperature",
    ):
        assert key in diff, key
    assert diff["trainer.lr"] == (base["trainer"]["lr"], 0.5)
    assert not [k for k in diff if k.startswith(("trainer.steps", "logger.", "eval."))]


def test_resume_refuses_a_changed_config_unless_forced(tiny, tmp_path, caplog):
    run(make_cfg(*FAST, "trainer.steps=2"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        run(
            make_cfg(
                *FAST, "trainer.steps=3", "trainer.lr=0.002", "algo.clip_high=0.3", "trainer.resume=auto"
            ),
            tmp_path,
        )
    message = str(err.value)
    assert "trainer.lr" in message and "algo.clip_high" in message and "trainer.resume_force=true" in message
    assert "trainer.steps" not in message
    assert (tmp_path / "metrics.jsonl").read_text() == before  # refused before touching anything
    with pytest.raises(ConfigError, match=r"trainer\.steps=1 is below"):
        run(make_cfg(*FAST, "trainer.steps=1", "trainer.resume=auto"), tmp_path)

    # More steps and an engine-side knob: allowed.
    run(make_cfg(*FAST, "trainer.steps=3", "rollout.batch_size=2", "trainer.resume=auto"), tmp_path)
    assert [r["step"] for r in comparable(tmp_path)] == [1, 2, 3]
    with caplog.at_level("WARNING", logger="trgrpo"):
        run(
            make_cfg(
                *FAST,
                "trainer.steps=4",
                "trainer.lr=0.002",
                "trainer.resume=auto",
                "trainer.resume_force=true",
            ),
            tmp_path,
        )
    assert "trainer.lr" in caplog.text and "forced" in caplog.text
    rows = comparable(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train/lr"] == pytest.approx(0.002 * 0.5)
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from"].endswith("step_3")
    # Resuming a finished run at its own length: nothing to do, nothing logged twice.
    assert run(make_cfg(*FAST, "trainer.steps=4", "trainer.lr=0.002", "trainer.resume=auto"), tmp_path) == {}
    assert [r["step"] for r in comparable(tmp_path)] == [1, 2, 3, 4]


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears if the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_state_file_holding_a_pickled_object_is_refused(tmp_path):
    import torch

    ckpt, marker = tmp_path / "ckpt" / "step_1", tmp_path / "pickle-ran"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "sampler": _Payload(marker)}, ckpt / checkpoint.STATE_FILE)
    with pytest.raises(ConfigError, match=r"not a tensor or plain value \([\w.]*open\): refused"):
        checkpoint.load_state(ckpt)
    assert not marker.exists()

    proc = start_train(tmp_path / "run", f"trainer.resume={ckpt}")
    out = finish(proc)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "trgrpo train: error: trainer.resume:" in errors[0], out[-3000:]
    assert "trainer_state.pt holds an object that is not a tensor or plain value" in errors[0]
    assert "Traceback" not in out and not marker.exists()


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None, reason="inductor needs a C++ compiler on CPU"
)
def test_a_run_with_the_compiled_decode_step_resumes_exactly(tiny, tmp_path):
    """rollout.compile=true under bf16, evaluating between training steps: the resumed process meets
    the shapes in another order than the uninterrupted one (its first decode is step 3's, not step 0's
    evaluation) and compiles afresh, and still logs the same numbers bit for bit."""
    common = (
        "rollout.compile=true",
        "trainer.precision=bf16",
        "trainer.eval_every=2",
        "trainer.save_every=2",
    )
    whole = start_train(tmp_path / "whole", *common, "trainer.steps=4")
    part = start_train(tmp_path / "part", *common, "trainer.steps=2")
    for proc in (whole, part):
        out = finish(proc)
        assert proc.returncode == 0, out[-3000:]
    resumed = start_train(tmp_path / "part", *common, "trainer.steps=4", "trainer.resume=auto")
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    status = json.loads((tmp_path / "part" / "run.json").read_text())
    assert status["decode_compile"] == "true" and status["resumed_from"].endswith("step_2")
    assert "torch.compile of the decode step failed" not in out
    assert_same_rows(comparable(tmp_path / "part"), comparable(tmp_path / "whole"))
