"""Sweeps (`trgrpo train -m`, `trgrpo plan -m`): every job checked before the first starts, a failed
job recorded while the others go on, and an interrupted sweep resumed by running its command again.

`SweepCheck` is a Hydra callback (the CLI adds it to `train` and `plan`). When a multirun starts it
checks every job (trgrpo/sweep_check.py: config, task data, and the job's folder
`hydra.sweep.dir/hydra.sweep.subdir`, by default `<job number>_<task>_<algo>_s<seed>`). Any problem
refuses the whole sweep (exit 2) before anything is written; `plan -m` prints the same check, job by
job, and stops there.

A job's folder decides what the job does (`job_state`): a run that finished at `trainer.steps` is
skipped; an earlier attempt (interrupted, killed, failed, or finished with fewer steps) resumes from
its newest checkpoint with `trainer.resume=auto`, as a single run does, or restarts when it has none;
an empty folder starts. So the same command into the same `hydra.sweep.dir` resumes a sweep. A job
that fails, whatever it fails on, gets `run.json` status `failed`, its error and exit code; the sweep
goes on and ends with a summary of the failed jobs and exit 1. A lock file keeps a second sweep out of
a folder that one is writing into.

Jobs run one after another (Hydra's basic launcher) or several at once (`hydra/launcher=joblib
hydra.launcher.n_jobs=N`, Hydra's joblib plugin; `experiment=sweep_cpu` uses it). A parallel job runs in
a worker process, where `on_job_start` marks the sweep active, so the worker skips, resumes and records
a failure as the sweep's own process would; `trainer.threads=auto` there gets its share of the cores
(run/host.py). The parent reads the failures from the jobs' run.json files at the end. Workers hold the
folder's lock shared and die with the sweep's process; on Ctrl-C the running jobs save and return, the
queued ones do not start (a stop file), and the sweep's process, which ignores the signal while its
workers run, ends with exit 130.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trgrpo.sweep_check import STATES, Job, check_sweep, count_states, job_lines, job_state, read_status

log = logging.getLogger("trgrpo")

LOCK = ".sweep.lock"
STOP = ".sweep.stop"  # a parallel sweep was interrupted: the jobs not yet started are left for the re-run
PARALLEL_ENV = "TRGRPO_SWEEP_PARALLEL"  # jobs a parallel sweep runs at once: run/host.py shares the cores


class SweepStop(BaseException):
    """Ends the command with `code` once the reason is printed. A BaseException, so that neither
    Hydra's callback runner nor its job runner (both catch Exception) takes it for a job's failure."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Sweep:
    """The sweep this process runs: set up by SweepCheck, read by the CLI's job wrapper."""

    active: bool = False
    folder: Path | None = None
    timestamped: bool = False  # the default folder name: a re-run of the command gets another one
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    shown: dict[int, str] = field(default_factory=dict)  # job number → the overrides that set it apart
    skipped: set[Path] = field(default_factory=set)
    snapshots: dict[Path, dict[str, bytes]] = field(default_factory=dict)  # finished jobs' .hydra/
    jobs: list[Job] = field(default_factory=list)  # every job, as checked (empty: another sweeper)
    worker: bool = False  # a worker process of a parallel launcher
    lock: Any = None
    sigint: Any = None  # the sweep process's own SIGINT handler while its workers run


STATE = _Sweep()


def prepare_job(cfg, run_dir: Path) -> bool:
    """Before a sweep job trains: True if its folder holds a finished run (skip it). An earlier attempt
    resumes from its newest checkpoint (trainer.resume=auto); one without a checkpoint starts again as
    configured (trainer.resume=auto, when unset, drops the attempt's logs)."""
    from trgrpo.run.checkpoint import wants_resume
    from trgrpo.run.metrics import write_status

    if STATE.worker and STATE.folder is not None and (STATE.folder / STOP).exists():
        log.info("%s: the sweep was interrupted: not started", run_dir)
        return True
    state, detail = job_state(run_dir, cfg.trainer.steps)
    if state == "finished":
        log.info("%s: finished %s: skipped", run_dir, detail)
        STATE.skipped.add(run_dir.resolve())
        return True
    if state in ("resume", "restart"):
        log.info("%s: an earlier attempt, %s %s", run_dir, STATES[state], detail)
        if state == "resume" or not wants_resume(cfg.trainer.resume):
            cfg.trainer.resume = "auto"
        write_status(run_dir, exit_code=None)
    return False


def job_interrupted() -> bool:
    """Ctrl-C reached a parallel sweep's job (which saved its checkpoint): True in a worker, after
    marking the sweep stopped so that its queued jobs do not start. The worker returns normally, so
    the launcher kills no other worker in the middle of saving; the sweep's process, which ignores
    the signal meanwhile, ends with exit 130 once every job has returned."""
    if not STATE.worker or STATE.folder is None:
        return False
    (STATE.folder / STOP).touch()
    return True


def job_failed(command: str, err: BaseException, code: int) -> None:
    """Record a failed sweep job in its run.json (status, error, exit code) and go on."""
    from hydra.core.hydra_config import HydraConfig

    from trgrpo.run.metrics import write_status

    hydra_cfg = HydraConfig.get()
    run_dir, num = Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.num
    plain = type(err).__name__ in ("ConfigError", "NonFiniteStep")
    message = " ".join(str(err).split()) if plain else f"{type(err).__name__}: {' '.join(str(err).split())}"
    if run_dir.is_dir():
        write_status(run_dir, status="failed", error=message, exit_code=code)
    shown = STATE.shown.get(num) or " ".join(hydra_cfg.overrides.task)
    line = _failure_line(num, shown, message, code, run_dir)
    STATE.failed.append(line)
    print(f"trgrpo {command}: job {line}; the sweep goes on", file=sys.stderr)


def resume_hint() -> str:
    """How to resume the current sweep ('' outside one)."""
    if not STATE.active:
        return ""
    if STATE.timestamped:
        return f"; to resume the sweep, re-run the same command with hydra.sweep.dir={STATE.folder}"
    return "; to resume the sweep, re-run the same command"


def _lock(folder: Path, *, create: bool) -> str | None:
    """Hold the sweep folder's lock for this process; the holder's pid when another process has it."""
    if STATE.lock is not None or not (create or folder.is_dir()):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        return holder
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    STATE.lock = handle
    return None


def _share_lock() -> None:
    """Once the checks pass, the sweep's process holds its lock shared, as its workers will: a second
    sweep (which needs it exclusive) stays out while any of them is alive."""
    if STATE.lock is None:
        return
    try:
        fcntl.flock(STATE.lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # another sweep took it in the moment between (flock does not convert atomically)
        print(f"trgrpo train: error: another sweep took {STATE.folder} just now", file=sys.stderr)
        raise SweepStop(2) from None


def _hold_shared_lock(folder: Path) -> None:
    """A worker holds the sweep folder's lock shared for its life (a worker that outlives a killed
    sweep keeps the next sweep out of the folder it may still write into)."""
    handle = (folder / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held exclusively: only by a sweep still checking its jobs
        handle.close()
        return
    STATE.lock = handle


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the sweep's process dies (a killed sweep kills its jobs, as
    one run by the basic launcher would be; they resume from their checkpoints)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the lock above still keeps a new sweep out
        pass


class SweepCheck(Callback):
    """Checks a multirun before its first job (refusing it, or, for `plan`, only reporting), restores
    the `.hydra/` record of the finished jobs it skips, and ends with a summary of the failed jobs."""

    def __init__(self, command: str = "train") -> None:
        self.command = command

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global STATE
        STATE = _Sweep(active=True, folder=Path(str(config.hydra.sweep.dir)))
        STATE.timestamped = "${now:" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False))
        name, dry = f"trgrpo {self.command}", self.command != "train"
        if not dry:
            self._lock(name, create=False)  # before the checks: another sweep may be writing there
        start = time.perf_counter()
        print(f"{name}: checking every job of the sweep into {STATE.folder} ...", flush=True)
        jobs = check_sweep(config)
        if jobs is None:
            print(f"{name}: not the basic sweeper: jobs are checked as they start", file=sys.stderr)
            if dry:
                raise SweepStop(0)
            return
        bad, took = [job for job in jobs if job.problems], f"{time.perf_counter() - start:.1f} s"
        if dry:
            print("\n".join(job_lines(jobs)))
            if bad:
                print(f"{len(bad)} of {len(jobs)} jobs have problems: fix them before training ({took})")
            else:
                at_once = parallel_jobs(config, len(jobs))
                pace = f", {at_once} at a time" if at_once > 1 else ""
                print(
                    f"all {len(jobs)} jobs valid{pace}: {count_states(jobs)} ({took}){_new_folder_note(dry)}"
                )
            raise SweepStop(2 if bad else 0)
        if bad:
            print(
                f"{name}: error: {len(bad)} of {len(jobs)} jobs cannot run, so none was started; fix them "
                "or drop them from the sweep (`trgrpo plan -m ...` checks a sweep):\n"
                + "\n".join(job_lines(bad)),
                file=sys.stderr,
            )
            raise SweepStop(2)
        self._lock(name, create=True)
        _share_lock()
        _remember(jobs)
        print(f"{name}: {len(jobs)} jobs checked ({took}): {count_states(jobs)}{_new_folder_note(dry)}")
        at_once = parallel_jobs(config, len(jobs))
        (STATE.folder / STOP).unlink(missing_ok=True)
        if at_once > 1:  # the workers, started after this, inherit it
            os.environ[PARALLEL_ENV] = str(at_once)
            # Ctrl-C reaches every process of the group: the jobs save and return (job_interrupted);
            # this process waits for them instead of letting the launcher kill them mid-save
            STATE.sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            print(f"{name}: {at_once} jobs at a time; trainer.threads=auto gives each its share of the cores")
        for line in dict.fromkeys(line.strip() for line in job_lines(jobs) if "warning:" in line):
            print(line)

    @staticmethod
    def _lock(name: str, *, create: bool) -> None:
        assert STATE.folder is not None
        holder = _lock(STATE.folder, create=create)
        if holder is not None:
            print(
                f"{name}: error: another sweep (pid {holder}) is writing into {STATE.folder}: wait for it "
                "to end, or give this one another hydra.sweep.dir",
                file=sys.stderr,
            )
            raise SweepStop(2)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global STATE
        if STATE.active or str(OmegaConf.select(config, "hydra.mode")) != "RunMode.MULTIRUN":
            return  # the sweep's own process (the basic launcher), or a single run
        # a worker process of a parallel launcher: the same job handling as the sweep's process
        STATE = _Sweep(active=True, folder=Path(str(config.hydra.sweep.dir)), worker=True)
        STATE.timestamped = "${now:" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the sweep's process ignores it
        _die_with_parent()
        _hold_shared_lock(STATE.folder)
        # loky marks its workers' start method as its own, which the processes a job spawns (the
        # verifier pool, vLLM) would be told to use and cannot find: back to the platform's default
        if multiprocessing.get_start_method(allow_none=True) == "loky":
            multiprocessing.set_start_method(None, force=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        STATE.ran += 1
        folder = Path(str(config.hydra.runtime.output_dir)).resolve()
        if folder in STATE.skipped:  # Hydra rewrote .hydra/ before the job: put back the run's own
            _restore(folder)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for folder in STATE.snapshots:  # skipped in a worker process: put back here
            _restore(folder)
        stop = STATE.folder / STOP if STATE.folder is not None else None
        if stop is not None and stop.exists():
            stop.unlink()
            print(f"trgrpo {self.command}: interrupted{resume_hint()}", file=sys.stderr)
            raise SweepStop(130)
        failed = _failed_jobs() if STATE.jobs else STATE.failed
        if failed:
            ran = len(STATE.jobs) or STATE.ran
            print(
                f"trgrpo {self.command}: error: {len(failed)} of {ran} jobs failed; "
                "each one's run.json has its error:\n"
                + "\n".join(f"  {line}" for line in failed)
                + f"\nre-run the same command to retry them: finished jobs are skipped{_folder_hint()}",
                file=sys.stderr,
            )
            raise SweepStop(1)


def parallel_jobs(config: DictConfig, jobs: int) -> int:
    """How many of the sweep's jobs its launcher runs at once: 1 for the basic launcher; for joblib,
    `hydra.launcher.n_jobs` (negative: joblib's count from the usable cores, -1 = all), at most the
    number of jobs, `jobs`."""
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:
        from joblib import cpu_count

        n_jobs = max(1, cpu_count() + 1 + n_jobs)
    return max(1, min(n_jobs, jobs))


def _restore(folder: Path) -> None:
    for name, data in STATE.snapshots.get(folder, {}).items():
        (folder / ".hydra" / name).write_bytes(data)


def _failed_jobs() -> list[str]:
    """One line per job whose run.json says it failed (in this process or in a worker)."""
    lines = []
    for job in STATE.jobs:
        info = read_status(job.folder) if job.folder is not None else {}
        if info.get("status") == "failed":
            error, code = info.get("error", "?"), info.get("exit_code", "?")
            lines.append(_failure_line(job.num, job.shown, error, code, job.folder))
    return lines


def _failure_line(num: int, shown: str, message: str, code: Any, run_dir: Path | None) -> str:
    """A failed job as the sweep prints it, when it fails and in the summary at the end."""
    return f"#{num} {shown}: {message} (exit {code}; run: {run_dir})"


def _remember(jobs: list[Job]) -> None:
    """What the jobs need: how to name each one, and the .hydra/ record of each finished run."""
    STATE.jobs = list(jobs)
    for job in jobs:
        STATE.shown[job.num] = job.shown
        hydra_dir = None if job.folder is None else job.folder / ".hydra"
        if job.state == "finished" and hydra_dir is not None and hydra_dir.is_dir():
            files = [path for path in hydra_dir.iterdir() if path.is_file()]
            STATE.snapshots[hydra_dir.parent.resolve()] = {path.name: path.read_bytes() for path in files}


def _folder_hint() -> str:
    return f" (with hydra.sweep.dir={STATE.folder})" if STATE.timestamped else ""


def _new_folder_note(dry: bool) -> str:
    if not STATE.timestamped:
        return ""
    if dry:
        return "; the folder is named by the time: name one (hydra.sweep.dir=...) to resume the sweep later"
    return (
        f"; the folder is named by the time: to resume this sweep later, add hydra.sweep.dir={STATE.folder}"
    )


def reset() -> None:
    """Forget the sweep (and release its lock): the command is over."""
    global STATE
    if STATE.lock is not None:
        STATE.lock.close()
    if STATE.sigint is not None:
        signal.signal(signal.SIGINT, STATE.sigint)
    STATE = _Sweep()
    os.environ.pop(PARALLEL_ENV, None)
