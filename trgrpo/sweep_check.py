"""Checking a sweep before its first job (trgrpo/sweep.py runs it): every job listed as Hydra's
BasicSweeper will list it (its own `split_arguments`: the same order, so the same job numbers and
folders), composed as the BasicLauncher will compose it, then checked: its config (`to_config`,
`validation.problems`, a `trainer.resume` path), its task data (once per distinct task config, before
any model is loaded), and its folder. A job's folder is `hydra.sweep.dir/hydra.sweep.subdir`; one that
already holds a run must hold this job's run (the same value of every key that changes training,
`resume_config.config_changes`), and what it holds decides what the job does (`job_state`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
STATES = {
    "finished": "finished, skipped",
    "resume": "to resume",
    "restart": "to start again",
    "new": "to start",
}


@dataclass
class Job:
    num: int
    shown: str  # the overrides that tell this job from the other jobs
    folder: Path | None = None
    state: str = "new"  # a key of STATES
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_status(folder: Path) -> dict:
    """A run folder's run.json ({} when it is missing or unreadable)."""
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def job_state(folder: Path, steps: int) -> tuple[str, str]:
    """(state, detail) of a job's folder: new, finished (at ≥ `steps`), resume (from its newest
    checkpoint) or restart (an earlier attempt without a checkpoint)."""
    from trgrpo.run.checkpoint import list_checkpoints

    if not (folder / "run.json").is_file():
        return "new", ""
    info = read_status(folder)
    last = info.get("last_step", 0)
    status = info.get("status", "unreadable")
    if status == "finished" and isinstance(last, int) and last >= steps:
        return "finished", f"(at step {last})"
    found = list_checkpoints(folder / "checkpoints")
    if found:
        return "resume", f"from checkpoints/{found[-1].name} (run.json: {status} at step {last})"
    return "restart", f"(no checkpoint; run.json: {status} at step {last})"


def _job_overrides(config: DictConfig, loader) -> list[list[str]] | None:
    """Every job's overrides, in Hydra's order (None for a sweeper other than the basic one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def _shown(jobs: list[list[str]]) -> list[str]:
    varying = {o.split("=", 1)[0] for job in jobs for o in job if any(o not in other for other in jobs)}
    return [" ".join(o for o in job if o.split("=", 1)[0] in varying) or " ".join(job) for job in jobs]


def _check_job(job: Job, master: DictConfig, loader, overrides: list[str]):
    """Compose one job as the launcher will; fill in its folder, state and problems; its Config."""
    from hydra.core.hydra_config import HydraConfig

    from trgrpo.cli import check_experiment, compose_message, to_config
    from trgrpo.config.resume import config_changes
    from trgrpo.config.schema import ConfigError
    from trgrpo.config.validation import problems
    from trgrpo.run.checkpoint import find_resume, list_checkpoints

    try:
        sweep_config = loader.load_sweep_config(master, overrides)
    except Exception as err:  # Hydra's compose errors: an unknown option, a misspelt key, ...
        job.problems.append(compose_message(err))
        return None
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = sweep_config.hydra.job.num = job.num
    job.folder = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
    raw = copy.deepcopy(sweep_config)
    with open_dict(raw):
        del raw["hydra"]
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(sweep_config)
    try:
        check_experiment(sweep_config.hydra.runtime.choices)
        cfg = to_config(raw)
    except Exception as err:  # ConfigError, or OmegaConf's own
        job.problems.append(" ".join(str(err).split()))
        return None
    finally:
        HydraConfig.instance().cfg = previous
    job.problems += problems(cfg)
    saved = job.folder / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            changed = config_changes(
                OmegaConf.to_container(OmegaConf.load(saved), resolve=False),  # type: ignore[arg-type]
                OmegaConf.to_container(raw, resolve=False),  # type: ignore[arg-type]
            )
        except Exception as err:
            changed = {f"(unreadable: {type(err).__name__})": (None, None)}
        if changed:
            listed = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            newer = " (<absent>: a key newer than that run)" if "'<absent>'" in listed else ""
            job.problems.append(
                f"its folder {job.folder} holds a run of another config ({listed}){newer}: run the command "
                "that sweep was started with (jobs are numbered in the order of its values), or give this "
                "one a new hydra.sweep.dir"
            )
    job.state, job.detail = job_state(job.folder, cfg.trainer.steps)
    found = list_checkpoints(job.folder / "checkpoints")
    if job.state == "resume" and int(found[-1].name.removeprefix("step_")) > cfg.trainer.steps:
        job.problems.append(
            f"its newest checkpoint, {found[-1]}, is beyond trainer.steps={cfg.trainer.steps}"
        )
    if job.state == "new" and not job.problems:
        try:  # trainer.resume=<path> must hold a checkpoint (a job with its own resumes from those)
            find_resume(cfg.trainer.resume, job.folder)
        except ConfigError as err:
            job.problems.append(str(err))
    return cfg


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_data(checked: list[tuple[Job, Any]]) -> None:
    """Build each distinct task config's data once (as a job does before loading its model)."""
    from dataclasses import asdict

    from trgrpo.config.schema import ConfigError
    from trgrpo.tasks import make_task
    from trgrpo.tasks.data import task_data

    by_task: dict[str, list[tuple[Job, Any]]] = {}
    for job, cfg in checked:
        if cfg is not None and not job.problems and job.state != "finished":
            by_task.setdefault(json.dumps(asdict(cfg.task), sort_keys=True, default=str), []).append(
                (job, cfg)
            )
    logger, capture = logging.getLogger("trgrpo"), _Capture()
    propagate = logger.propagate
    logger.addHandler(capture)
    logger.propagate = False
    try:
        for members in by_task.values():
            capture.messages.clear()
            cfg = members[0][1]
            try:
                task_data(make_task(cfg.task), cfg.task)
                found = []
            except ConfigError as err:
                found = [" ".join(str(err).split())]
            except Exception as err:
                found = [
                    f"task={cfg.task.name}: the task data could not be built: {type(err).__name__}: {err}"
                ]
            for job, _ in members:
                job.problems += found
                job.warnings += capture.messages
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate


def check_sweep(config: DictConfig) -> list[Job] | None:
    """Every job of the multirun `config`, checked (None when its sweeper is not Hydra's basic one)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    lists = _job_overrides(config, loader)
    if lists is None:
        return None
    jobs = [Job(num, shown) for num, shown in enumerate(_shown(lists))]
    checked = [(job, _check_job(job, config, loader, overrides)) for job, overrides in zip(jobs, lists)]
    _check_data(checked)
    return jobs


def job_lines(jobs: list[Job]) -> list[str]:
    out = []
    for job in jobs:
        where = f" → {job.folder.name}" if job.folder is not None else ""
        verdict = f"{len(job.problems)} problem(s)" if job.problems else f"{STATES[job.state]} {job.detail}"
        out.append(f"  #{job.num} {job.shown}{where}: {verdict.rstrip()}")
        out += [f"      PROBLEM: {p}" for p in job.problems]
        out += [f"      warning: {w}" for w in dict.fromkeys(job.warnings)]
    return out


def count_states(jobs: list[Job]) -> str:
    counts = {state: sum(job.state == state for job in jobs) for state in STATES}
    return ", ".join(f"{n} {STATES[s]}" for s, n in counts.items() if n)
