"""Sweeps that survive (`trgrpo train -m`): every job is checked before the first starts (`plan -m` is
the same check as a dry run); a job that fails is recorded in its run.json while the others go on, and
the command ends with a summary and exit 1; the same command into the same hydra.sweep.dir skips the
finished jobs, resumes an interrupted one exactly from its last checkpoint and starts the rest.
Subprocesses on the fast tiny model, as a user runs them; the task-data checks run in-process.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, FAST_ANY_TASK, make_cfg
from test_resume import RUN, assert_same_rows, comparable, finish, reference_rows, wait_for_step

from trgrpo.config.schema import ConfigError
from trgrpo.run import checkpoint
from trgrpo.run.records import Example
from trgrpo.sweep import LOCK, STOP
from trgrpo.tasks import make_task
from trgrpo.tasks.data import task_data
from trgrpo.train import run as train_run

SWEEP = [*RUN, "trainer.save_every=2", "algo=grpo,tr_grpo,dr_grpo"]  # job #1 is test_resume's RUN
FOLDERS = ("0_math_grpo_s0", "1_math_tr_grpo_s0", "2_math_dr_grpo_s0")


def trgrpo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trgrpo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def start_sweep(folder: Path, overrides: list[str] = SWEEP) -> subprocess.Popen:
    """`trgrpo train -m <overrides>` in the background, its console in a file (as
    test_resume.start_train), in a process group of its own, as a terminal gives it."""
    console = folder.parent / "console.txt"
    with console.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trgrpo", "train", "-m", *overrides, f"hydra.sweep.dir={folder}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
    proc.console = console  # type: ignore[attr-defined]
    return proc


def status(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def test_plan_m_checks_every_job_and_writes_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    done = trgrpo(
        "plan",
        "-m",
        *FAST,
        "rollout.group_size=1,4",
        "task.generators.0.params.min_digits=1",
        "task.generators.0.params.max_digits=1,2",
        f"hydra.sweep.dir={sweep}",
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out
    jobs = [line for line in done.stdout.splitlines() if line.startswith("  #")]
    assert [line.split()[0] for line in jobs] == ["#0", "#1", "#2", "#3"]
    assert "rollout.group_size=1 task.generators.0.params.max_digits=1" in jobs[0]
    assert "PROBLEM: rollout.group_size=1: group advantages need at least 2 samples" in out
    assert "no held-out problems are left" in out  # job #2's task data, before any model is loaded
    assert jobs[3].endswith("→ 3_math_tr_grpo_s0: to start")
    assert "3 of 4 jobs have problems" in out
    assert not sweep.exists()  # a dry run


def test_train_m_refuses_a_sweep_with_a_bad_job_before_any_starts(tmp_path):
    sweep = tmp_path / "sweep"
    done = trgrpo(
        "train", "-m", *FAST, "trainer.steps=1", "rollout.group_size=1,2", f"hydra.sweep.dir={sweep}"
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "1 of 2 jobs cannot run, so none was started" in errors[0], done.stderr
    assert "#0 rollout.group_size=1" in done.stderr and "need at least 2 samples" in done.stderr
    assert not sweep.exists()  # job #1 was not started either


@pytest.mark.parametrize("mode", [fcntl.LOCK_EX, fcntl.LOCK_SH], ids=["sweep", "worker"])
def test_a_second_sweep_into_a_busy_folder_is_refused(tmp_path, mode):
    """Held exclusively (a sweep checking its jobs) or shared (a running sweep, or a parallel sweep's
    worker that outlived it): refused, nothing written."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with (sweep / LOCK).open("w") as held:
        fcntl.flock(held, mode | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        done = trgrpo("train", "-m", *FAST, "trainer.steps=1", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 2, done.stderr
    assert "another sweep (pid 4242) is writing into" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in sweep.iterdir()) == [LOCK]


PARALLEL = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


@pytest.mark.parametrize("launcher", [[], PARALLEL], ids=["one_at_a_time", "parallel"])
def test_failed_jobs_are_recorded_and_the_sweep_goes_on(tiny, tmp_path, launcher):
    """Jobs that fail at run time (an unreadable model folder: exit 1; a checkpoint holding a pickled
    object: a ConfigError, exit 2) are recorded; the last job trains; `trgrpo report` lists the rest.
    The same when the jobs run two at a time in worker processes (the summary from their run.json)."""
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    pickled = tmp_path / "pickled" / "step_1"
    pickled.mkdir(parents=True)
    torch.save({"step": 1, "where": Path("x")}, pickled / checkpoint.STATE_FILE)
    sweep = tmp_path / "sweep"
    done = trgrpo(
        "train",
        "-m",
        *FAST,
        "trainer.steps=2",
        f"model.path={bad_model},null",
        f"trainer.resume={pickled},null",
        f"hydra.sweep.dir={sweep}",
        *launcher,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = done.stderr[done.stderr.index("3 of 4 jobs failed") :]
    assert [line.split()[0] for line in summary.splitlines()[1:4]] == ["#0", "#1", "#2"]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    codes = [status(run).get("exit_code") for run in runs]
    assert codes == [2, 1, 2, None], [status(run) for run in runs]
    assert "holds an object that is not a tensor" in status(runs[0])["error"]
    assert status(runs[1])["status"] == "failed" and "hidden_size" in status(runs[1])["error"]
    assert status(runs[3])["status"] == "finished" and status(runs[3])["last_step"] == 2
    assert "Traceback" in next(runs[1].glob("*.log")).read_text()  # the trace is in the job's log only

    from trgrpo.report.tables import main as report

    assert report([str(sweep), "--format", "md"]) == 0
    excluded = (sweep / "report.md").read_text().split("## Runs not included")[1]
    for run in runs[:3]:
        row = next(line for line in excluded.splitlines() if run.name in line)
        assert "failed: " in row and f"(exit {status(run)['exit_code']})" in row, row


def test_a_killed_sweep_resumes_where_it_stopped(tiny, tmp_path, tmp_path_factory):
    """SIGKILL a 3-job sweep while job #1 trains; the same command again skips job #0, resumes job #1
    from its last checkpoint (logging what an uninterrupted run logs) and starts job #2."""
    reference = reference_rows(tmp_path_factory.getbasetemp())
    sweep = tmp_path / "sweep"
    first, second, third = (sweep / name for name in FOLDERS)
    proc = start_sweep(sweep)
    wait_for_step(proc, second, 3)
    proc.kill()
    finish(proc)
    killed_at = comparable(second)[-1]["step"]
    assert killed_at < RUN_STEPS, "job #1 finished before it was killed: nothing was tested"
    assert status(first)["status"] == "finished" and status(second)["status"] == "running"
    assert not third.exists()
    before = {p: p.read_bytes() for p in [first / "metrics.jsonl", *sorted((first / ".hydra").iterdir())]}

    plan = trgrpo("plan", "-m", *SWEEP, f"hydra.sweep.dir={sweep}")  # the dry run says what will happen
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "#0 algo=grpo → 0_math_grpo_s0: finished, skipped" in plan.stdout
    assert "#1 algo=tr_grpo → 1_math_tr_grpo_s0: to resume from checkpoints/step_" in plan.stdout
    assert "#2 algo=dr_grpo → 2_math_dr_grpo_s0: to start" in plan.stdout
    other = trgrpo("plan", "-m", *SWEEP, "trainer.lr=0.5", f"hydra.sweep.dir={sweep}")
    assert other.returncode == 2 and "holds a run of another config (trainer.lr: " in other.stdout

    again = start_sweep(sweep)
    out = finish(again, timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert "3 jobs checked" in out and "1 finished, skipped, 1 to resume, 1 to start" in out
    assert before == {p: p.read_bytes() for p in before}  # skipped: not a byte rewritten
    resumed = Path(status(second)["resumed_from"])
    assert status(second)["status"] == "finished" and resumed.parent == second / "checkpoints"
    assert int(resumed.name.removeprefix("step_")) <= killed_at
    assert_same_rows(comparable(second), reference)  # exactly as a single run resumes
    assert status(third)["status"] == "finished" and "resumed_from" not in status(third)
    assert [row["step"] for row in comparable(third)][-1] == RUN_STEPS


RUN_STEPS = int(next(o for o in RUN if o.startswith("trainer.steps=")).split("=")[1])


def _workers(sweep_pid: int) -> list[int]:
    """The live worker processes a parallel sweep started (its loky children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == sweep_pid and b"popen_loky" in cmdline and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_parallel_sweep_killed_takes_its_jobs_along_and_resumes_like_one_run(tiny, tmp_path):
    """Two jobs at a time in worker processes: SIGKILL the sweep while both train; its workers die
    with it (no orphan keeps writing into a job folder); the same command resumes both from their
    checkpoints and each ends as its uninterrupted single run logs it, bit for bit. The jobs verify
    in a process pool of their own (which a worker's inherited start method used to break)."""
    jobs = [*FAST, "trainer.verify_workers=1", "trainer.steps=60", "trainer.save_every=5"]
    jobs += ["model.tiny.seed=0", "seed=0,1"]
    sweep = tmp_path / "sweep"
    proc = start_sweep(sweep, [*jobs, *PARALLEL])
    runs = [sweep / "0_math_tr_grpo_s0", sweep / "1_math_tr_grpo_s1"]
    for run_dir in runs:
        wait_for_step(proc, run_dir, 6)
    workers = _workers(proc.pid)
    assert len(workers) == 2, finish(proc)[-3000:]
    proc.kill()
    finish(proc)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the killed sweep"
        time.sleep(0.2)
    killed = [comparable(run_dir)[-1]["step"] for run_dir in runs]
    assert all(step < 60 for step in killed), f"a job finished before the kill: nothing tested ({killed})"

    again = trgrpo("train", "-m", *jobs, *PARALLEL, f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 to resume" in again.stdout and "2 jobs at a time" in again.stdout, again.stdout
    for seed, run_dir in enumerate(runs):
        assert status(run_dir)["status"] == "finished" and "resumed_from" in status(run_dir)
        single = tmp_path / f"single_{seed}"
        train_run(make_cfg(*jobs[:-1], f"seed={seed}"), single)
        assert_same_rows(comparable(run_dir), comparable(single))


def test_ctrl_c_stops_a_parallel_sweep_once_its_jobs_have_saved(tiny, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during a parallel sweep: each running job saves
    its checkpoint (none is killed mid-save by the launcher), the queued job does not start, and the
    sweep ends with exit 130 and a resume hint; `plan -m` then lists the saved steps to resume."""
    jobs = [*FAST, "trainer.steps=200", "model.tiny.seed=0", "seed=0,1,2", *PARALLEL]
    sweep = tmp_path / "sweep"
    proc = start_sweep(sweep, jobs)
    runs = [sweep / "0_math_tr_grpo_s0", sweep / "1_math_tr_grpo_s1", sweep / "2_math_tr_grpo_s2"]
    for run_dir in runs[:2]:
        wait_for_step(proc, run_dir, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out = finish(proc, timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "trgrpo train: interrupted; to resume the sweep, re-run the same command" in out
    assert "Traceback" not in out, out[-3000:]
    for run_dir in runs[:2]:
        info = status(run_dir)
        assert info["status"] == "interrupted", info
        assert checkpoint.is_saved(run_dir / "checkpoints", info["last_step"]), info
    assert not (runs[2] / "run.json").exists()  # queued: not started
    assert not (sweep / STOP).exists()
    plan = trgrpo("plan", "-m", *jobs, f"hydra.sweep.dir={sweep}")
    assert "2 to resume, 1 to start" in plan.stdout, plan.stdout + plan.stderr


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------ task data, before a model


class _Repeats:
    """A task whose held-out split repeats one problem."""

    def __init__(self, test_items: int) -> None:
        self.test_items = test_items

    def dataset(self, split, size, seed):
        if split == "train":
            return [Example(f"t{i}", f"train {i}", "1") for i in range(size)]
        return [Example(f"e{i}", "the same question", "1") for i in range(self.test_items)]


def test_a_held_out_split_with_fewer_distinct_problems_than_eval_size_warns(caplog):
    tc = make_cfg(*FAST).task
    with caplog.at_level(logging.WARNING, logger="trgrpo"):
        task_data(_Repeats(tc.eval_size), tc)
    assert (
        f"the held-out split has 1 distinct problems ({tc.eval_size} in all) of task.eval_size="
        in caplog.text
    )
    with pytest.raises(ConfigError, match="no held-out problems are left"):
        task_data(_Repeats(0), tc)


@pytest.mark.parametrize("task", ["math", "logic", "tool_qa"])
def test_every_task_checks_its_data_sizes(task, caplog):
    """Every task's data goes through task_data before a model is loaded: disjoint splits, and a
    held-out split that repeats many problems warns (math's default 128 draws of 2-digit sums repeat a
    few: no warning for those)."""
    sizes = ["task.train_size=512", "task.eval_size=128"] if task == "math" else []
    cfg = make_cfg(*FAST_ANY_TASK, f"task={task}", *sizes)
    with caplog.at_level(logging.WARNING, logger="trgrpo"):
        train, held_out = task_data(make_task(cfg.task), cfg.task)
    assert len(train) == cfg.task.train_size and len(held_out) == cfg.task.eval_size
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held_out}
    distinct = len({ex.prompt for ex in held_out})
    warned = f"held-out split has {distinct} distinct problems" in caplog.text
    assert warned == (distinct < 0.9 * len(held_out))
    if task == "math":
        assert 0.9 * len(held_out) <= distinct < len(held_out)
