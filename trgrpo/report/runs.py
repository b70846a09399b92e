"""Run directories of `trgrpo report`: discovery, reading (never raising), grouping into configurations.

A run directory is any folder holding `metrics.jsonl` or `run.json` (a Hydra multirun folder holds one
per numbered subfolder). `load_run` turns every defect (missing or unreadable file, unfinished status,
truncated metrics line) into a problem string; a run with problems stays out of the statistics.
`group_runs` groups runs by task, algorithm and every config key that differs between runs, except the
seed, output paths and logging settings. Statistics and output: `trgrpo/report/tables.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trgrpo.run.metrics import read_metrics

BASELINE = "grpo"  # every other algorithm is compared with this one; listed first
# Config keys that never split groups: the seed, where outputs go, how metrics are logged, how many
# CPU threads did the arithmetic (the same experiment, summed in a different order).
IGNORED_KEYS = (
    "seed",
    "task.name",
    "algo.name",
    "trainer.resume",
    "trainer.threads",
    "eval.checkpoint",
)
IGNORED_PREFIXES = ("hydra.", "logger.")
IGNORED_LEAVES = ("output_dir", "out_dir", "run_dir", "save_dir", "log_dir", "output")


@dataclass(frozen=True)
class Run:
    """One run directory as read from disk; `problems` non-empty means left out of the statistics."""

    path: Path
    task: str | None
    algo: str | None
    seed: int | None
    config: dict[str, Any]  # flattened: dotted key → value; empty when .hydra/config.yaml is missing
    metrics: list[dict[str, Any]]  # readable metrics.jsonl records, in file order
    eval: dict[str, Any] | None  # eval.json contents
    problems: tuple[str, ...]

    @property
    def included(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Group:
    """Runs sharing task, algorithm and the values of every splitting config key (seeds differ)."""

    task: str
    algo: str
    extras: tuple[tuple[str, str], ...]  # (config key, value) that distinguish this group
    runs: tuple[Run, ...]  # all runs, included or not

    @property
    def name(self) -> str:
        return f"{self.task}/{self.algo}" + "".join(f" {k}={v}" for k, v in self.extras)

    @property
    def included(self) -> list[Run]:
        return [r for r in self.runs if r.included]


# --------------------------------------------------------------------------------------- discovery


def find_run_dirs(roots: Sequence[Path]) -> list[Path]:
    """Every folder under `roots` (themselves included) with metrics.jsonl or run.json, sorted."""
    found: set[Path] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if "metrics.jsonl" in filenames or "run.json" in filenames:
                found.add(Path(dirpath).resolve())  # overlapping DIRs give each run once
                dirnames.clear()  # checkpoints/ and .hydra/ are not runs
            dirnames[:] = [d for d in dirnames if d not in ("figures", ".hydra")]
    return sorted(found)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _read_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf  # only the report reads YAML outside Hydra

    cfg = OmegaConf.load(path)
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # ${hydra:...} and the like only resolve inside a Hydra app
        tree = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(tree, dict):
        raise ValueError("not a mapping")
    return _flatten(tree)


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"{path.name} unreadable ({err.__class__.__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _status_problem(info: dict[str, Any] | None) -> str | None:
    if info is None:
        return None
    status = info.get("status")
    if status == "finished":
        return None
    where = f"last step {info.get('last_step', '?')} of {info.get('steps', '?')}"
    if status == "failed":
        code = f" (exit {info['exit_code']})" if "exit_code" in info else ""
        return f"failed: {info.get('error') or 'no error message'}{code}"
    if status == "running":
        return f"still running or killed ({where})"
    if status == "interrupted":
        return f"interrupted ({where}): resume it with trainer.resume=auto, or re-run its sweep"
    return f"unknown status {status!r} in run.json"


def load_run(path: Path) -> Run:
    """Read one run directory; every defect becomes a problem string, nothing raises."""
    problems: list[str] = []
    info = _read_json(path / "run.json", problems)
    if info is None and not (path / "run.json").exists():
        problems.append("run.json missing (status unknown)")
    if (status := _status_problem(info)) is not None:
        problems.append(status)
    config: dict[str, Any] = {}
    config_path = path / ".hydra" / "config.yaml"
    if not config_path.is_file():
        problems.append(".hydra/config.yaml missing")
    else:
        try:
            config = _read_config(config_path)
        except Exception as err:
            problems.append(f".hydra/config.yaml unreadable ({err.__class__.__name__})")
    metrics: list[dict[str, Any]] = []
    if not (path / "metrics.jsonl").is_file():
        problems.append("metrics.jsonl missing")
    else:
        try:
            metrics, metric_problems = read_metrics(path / "metrics.jsonl")
            problems.extend(metric_problems)
        except OSError as err:
            problems.append(f"metrics.jsonl unreadable ({err.__class__.__name__})")
    eval_data = _read_json(path / "eval.json", problems)
    info = info or {}
    task = config.get("task.name", info.get("task"))
    algo = config.get("algo.name", info.get("algo"))
    seed = config.get("seed", info.get("seed"))
    if task is None or algo is None:
        problems.append("task or algorithm unknown")
    if not isinstance(seed, int):
        problems.append("seed unknown")
        seed = None
    return Run(path, task, algo, seed, config, metrics, eval_data, tuple(problems))


# ---------------------------------------------------------------------------------------- grouping


def _ignored(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or leaf in IGNORED_LEAVES


def _owner(key: str) -> str | None:
    return "task" if key.startswith("task.") else "algo" if key.startswith("algo.") else None


def splitting_keys(runs: Sequence[Run]) -> dict[str, set[str] | None]:
    """Config keys whose values differ between runs (seed, output paths and logging excepted).

    Maps key → None when it splits runs everywhere. A task.* (algo.*) key splits only the runs of the
    task (algorithm) names within which it varies, and maps to that set of names: the grpo and tr_grpo
    presets differ in algo.weights.shape, which algo.name already says; a sweep of algo.weights.alpha
    over tr_grpo runs does not rename the grpo groups.
    """
    with_config = [r for r in runs if r.config]
    keys = sorted({k for r in with_config for k in r.config if not _ignored(k)})
    out: dict[str, set[str] | None] = {}
    for key in keys:
        owner = _owner(key)
        buckets: dict[Any, set[str]] = defaultdict(set)
        for run in with_config:
            bucket = getattr(run, owner) if owner else None
            buckets[bucket].add(json.dumps(run.config.get(key, "<unset>"), sort_keys=True, default=str))
        varying = {str(name) for name, values in buckets.items() if len(values) > 1}
        if varying:
            out[key] = varying if owner else None
    return out


def _extras(run: Run, keys: dict[str, set[str] | None]) -> tuple[tuple[str, str], ...]:
    if not run.config:
        return ()
    return tuple(
        (key, str(run.config.get(key, "<unset>")))
        for key, within in keys.items()
        if within is None or str(getattr(run, _owner(key) or "task")) in within
    )


def _algo_order(algo: str) -> tuple[int, str]:
    return (0 if algo == BASELINE else 1, algo)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs with a known task and algorithm; runs without a config join the plain task/algo group."""
    keys = splitting_keys(runs)
    members: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Run]] = defaultdict(list)
    for run in runs:
        if run.task is None or run.algo is None:
            continue
        members[(str(run.task), str(run.algo), _extras(run, keys))].append(run)
    ordered = sorted(members, key=lambda g: (g[0], _algo_order(g[1]), g[2]))
    return [Group(task, algo, extras, tuple(members[(task, algo, extras)])) for task, algo, extras in ordered]


def series(metrics: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step; non-numeric and non-finite values are skipped, and a
    step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in metrics:
        value, step = record.get(key), record.get("step")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not isinstance(step, (int, float))
        ):
            continue
        if math.isfinite(value):
            by_step[int(step)] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64)
