"""Faults a long run meets, and what it does about them: a non-finite loss skips the optimizer step
(counted; too many in a row abort with a clean error), a crashing or hanging verifier scores 0 and is
counted as unscorable, a failed checkpoint write leaves the previous checkpoint and training goes on,
and Ctrl-C saves a checkpoint that resumes exactly.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_cfg
from test_resume import (
    RUN,
    STEPS,
    assert_same_rows,
    comparable,
    finish,
    reference_rows,
    start_train,
    wait_for_step,
)

from trgrpo import train
from trgrpo.learner import learner as learner_module
from trgrpo.models.load import load_policy
from trgrpo.run import checkpoint
from trgrpo.run.interrupts import InterruptGuard
from trgrpo.run.records import Example
from trgrpo.tasks import make_task
from trgrpo.tasks.verify_pool import VerifyPool

HANG_MARKER = "TRGRPO_TEST_HANG_MARKER"


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _nan_on_calls(monkeypatch, calls: set[int] | None) -> None:
    """policy_loss returns a NaN loss on the given 1-based calls (None: on every call)."""
    real, count = learner_module.policy_loss, [0]

    def policy_loss(*args, **kwargs):
        count[0] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls is None or count[0] in calls else (loss, parts)

    monkeypatch.setattr(learner_module, "policy_loss", policy_loss)


def test_nonfinite_steps_are_skipped_and_counted(tiny, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {1, 2})  # one micro-batch a step: steps 1 and 2
    cfg = make_cfg(*FAST, "trainer.steps=3", "trainer.save_every=2", "trainer.max_bad_steps=3")
    initial = {k: v.clone() for k, v in load_policy(cfg.model, cfg.task)[0].state_dict().items()}
    train.run(cfg, tmp_path)
    rows = comparable(tmp_path)
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 2.0, 2.0]
    assert rows[0]["train/grad_norm"] is None and isinstance(rows[2]["train/grad_norm"], float)
    assert _status(tmp_path)["status"] == "finished"
    at_2, _ = load_policy(cfg.model.__class__(path=str(tmp_path / "checkpoints" / "step_2")), cfg.task)
    assert all(torch.equal(v, initial[k]) for k, v in at_2.state_dict().items())  # nothing applied
    at_3, _ = load_policy(cfg.model.__class__(path=str(tmp_path / "checkpoints" / "step_3")), cfg.task)
    assert any(not torch.equal(v, initial[k]) for k, v in at_3.state_dict().items())


NAN_CLI = """
import sys
import trgrpo.learner.learner as learner
real = learner.policy_loss
def policy_loss(*args, **kwargs):
    loss, parts = real(*args, **kwargs)
    return loss * float("nan"), parts
learner.policy_loss = policy_loss
from trgrpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_failing(script: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`trgrpo train` through `script` (which patches something, then calls the CLI) in a subprocess:
    it must exit 1 without a traceback."""
    done = subprocess.run(
        [sys.executable, "-c", script, "train", *FAST, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    return done


def test_too_many_nonfinite_steps_abort_with_a_clean_error(tiny, tmp_path):
    done = _train_failing(NAN_CLI, tmp_path, "trainer.steps=6", "trainer.max_bad_steps=2")
    assert "trgrpo train: error: 2 optimizer steps in a row had a non-finite loss" in done.stderr
    status = _status(tmp_path)
    assert status["status"] == "failed" and "non-finite" in status["error"]
    assert [r["train/skipped_steps"] for r in comparable(tmp_path)] == [1.0]  # step 2 aborted


BROKEN_VERIFIERS_CLI = """
import functools, sys
sys.path.insert(0, {tests!r})
import slow_task
import trgrpo.train as train
from trgrpo.tasks.verify_pool import VerifyPool
train.VerifyPool = functools.partial(VerifyPool, factory=slow_task.broken_in_workers)
from trgrpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_verifier_workers_that_cannot_start_end_the_run_with_a_clean_error(tiny, tmp_path):
    script = BROKEN_VERIFIERS_CLI.format(tests=str(Path(__file__).parent))
    done = _train_failing(script, tmp_path, "trainer.steps=2", "trainer.verify_workers=1")
    assert (
        "trgrpo train: error: the verifier worker could not build the task (ImportError: no module named "
        "'verifier_backend'); trainer.verify_workers=0 verifies in the training process" in done.stderr
    )
    status = _status(tmp_path)
    assert status["status"] == "failed" and "could not build the task" in status["error"]


class CrashingTask:
    """The real task, whose verifier raises on odd-length responses."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def verify(self, example, response):
        if len(response) % 2:
            raise RuntimeError("verifier bug")
        return self.inner.verify(example, response)


def test_a_crashing_verifier_scores_zero_and_is_counted(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "make_task", lambda cfg: CrashingTask(make_task(cfg)))
    train.run(make_cfg(*FAST, "trainer.steps=2", "trainer.samples_per_step=16"), tmp_path)
    assert _status(tmp_path)["status"] == "finished"
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    odd = [s for s in samples if len(s["response"]) % 2]
    assert odd and all(s["reward"] == 0.0 for s in odd)
    for row in comparable(tmp_path):
        step_odd = sum(1 for s in odd if s["step"] == row["step"])
        assert row["verify/unscorable"] == step_odd


class HangOnce:
    """Built in each verifier worker: the real task, whose very first verify call (across workers,
    through a marker file) hangs."""

    def __init__(self, cfg):
        self.inner = make_task(cfg)
        self.inner.verify(Example("warm-up", "1 + 1", "2"), "2")  # lazy imports, outside the timeout

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def verify(self, example, response):
        marker = Path(os.environ[HANG_MARKER])
        if not marker.exists():
            marker.touch()
            time.sleep(120)
        return self.inner.verify(example, response)


def test_a_hanging_verifier_times_out_and_the_run_goes_on(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(HANG_MARKER, str(tmp_path / "hung"))
    monkeypatch.setattr(train, "VerifyPool", functools.partial(VerifyPool, factory=HangOnce))
    started = time.perf_counter()
    train.run(
        make_cfg(*FAST, "trainer.steps=1", "trainer.verify_workers=1", "trainer.verify_timeout=3"),
        tmp_path / "run",
    )
    assert time.perf_counter() - started < 90  # cut at the timeout, not after the 120 s sleep
    assert (tmp_path / "hung").exists()
    assert comparable(tmp_path / "run")[0]["verify/unscorable"] == 1.0
    assert _status(tmp_path / "run")["status"] == "finished"


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny, tmp_path, monkeypatch, caplog):
    """step 2 saves; step 4 cannot write the model (permissions), step 6 its state (disk full)."""
    from transformers import PreTrainedModel

    real_model_save, real_torch_save = PreTrainedModel.save_pretrained, torch.save

    def model_save(self, folder, *args, **kwargs):
        if ".tmp-step_4-" in str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real_model_save(self, folder, *args, **kwargs)

    def torch_save(obj, path, *args, **kwargs):
        if ".tmp-step_6-" in str(path):
            raise OSError(28, "No space left on device")
        return real_torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", model_save)
    monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    with caplog.at_level("WARNING", logger="trgrpo"):
        train.run(make_cfg(*FAST, "trainer.steps=6", "trainer.save_every=2"), tmp_path)
    assert "step_4 failed" in caplog.text and "Permission denied" in caplog.text
    assert "step_6 failed" in caplog.text and "No space left on device" in caplog.text
    status = _status(tmp_path)
    assert status["status"] == "finished" and status["last_step"] == 6
    assert status["checkpoint_error"].startswith("step 6:") and "No space left" in status["checkpoint_error"]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]  # no partial folder left behind
    assert checkpoint.find_resume("auto", tmp_path) == ckpts / "step_2"
    assert checkpoint.load_state(ckpts / "step_2")["step"] == 2
    assert [r["step"] for r in comparable(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny, tmp_path, tmp_path_factory):
    reference = reference_rows(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, "trainer.save_every=3")
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "trgrpo train: interrupted" in out
    status = _status(run_dir)
    stopped = status["last_step"]
    assert status["status"] == "interrupted" and 2 <= stopped < STEPS
    assert [r["step"] for r in comparable(run_dir)] == list(range(1, stopped + 1))
    assert checkpoint.find_resume("auto", run_dir) == run_dir / "checkpoints" / f"step_{stopped}"

    resumed = start_train(run_dir, "trainer.save_every=3", "trainer.resume=auto")
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert _status(run_dir)["status"] == "finished"
    assert_same_rows(comparable(run_dir), reference)


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler, whatever this test process inherited (a background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["sampling", "update"])
def test_ctrl_c_anywhere_in_a_step_saves_a_consistent_checkpoint(
    where, tiny, tmp_path, tmp_path_factory, monkeypatch, default_sigint
):
    """While sampling, the step is abandoned (the sampler goes back); during the update, it is finished
    first. Either way the checkpoint resumes to exactly the uninterrupted run."""
    reference = reference_rows(tmp_path_factory.getbasetemp())
    real_sample, real_step = train.sample_groups, learner_module.Learner.step

    def sample_groups(ctx, sampler, cfg, step):
        out = real_sample(ctx, sampler, cfg, step)  # the sampler has moved on
        if step == 3:
            raise KeyboardInterrupt
        return out

    def learner_step(self, *args, **kwargs):
        if self.scheduler.last_epoch == 2:  # the third update
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)

    if where == "sampling":
        monkeypatch.setattr(train, "sample_groups", sample_groups)
    else:
        monkeypatch.setattr(learner_module.Learner, "step", learner_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(make_cfg(*RUN), tmp_path)
    stopped = 2 if where == "sampling" else 3
    assert _status(tmp_path)["status"] == "interrupted" and _status(tmp_path)["last_step"] == stopped
    assert checkpoint.find_resume("auto", tmp_path) == tmp_path / "checkpoints" / f"step_{stopped}"
    monkeypatch.undo()
    train.run(make_cfg(*RUN, "trainer.resume=auto"), tmp_path)
    assert_same_rows(comparable(tmp_path), reference)


@pytest.mark.parametrize("presses", [0, 1, 2])
def test_interrupt_guard_holds_ctrl_c_until_the_step_ends(presses, default_sigint):
    """Outside hold(): at once. Inside: after the block; a second press: at once, marked torn."""
    guard = InterruptGuard()
    with guard:
        if presses == 0:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            return
        reached = []
        with pytest.raises(KeyboardInterrupt), guard.hold():
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
            reached.append("end of block")
        assert reached == (["end of block"] if presses == 1 else [])
        assert guard.torn == (presses == 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
