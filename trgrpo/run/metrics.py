"""MetricsLogger: one JSON line a step in metrics.jsonl, a few samples a step in samples.jsonl, wandb
when enabled, and a rich progress bar with a summary line every few steps on the console.

Only the process that owns the run directory logs (rank 0 under torchrun). Warnings are printed once
per kind, so a condition that holds every step (constant token weights, say) does not flood the log.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trgrpo.config.schema import LoggerConfig

log = logging.getLogger("trgrpo")
SUMMARY_KEYS = (
    "reward/mean",
    "eval_accuracy",
    "train/grad_norm",
    "weights/mean",
    "rollout/response_len",
    "time/step",
)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


SHAPING_MIN_STEPS = 10  # steps of history before the shaping check speaks
SHAPING_MIN_RISE = 0.05  # a reward rise this large (first fifth → last fifth) is worth explaining
SHAPING_SHARE = 0.25  # ... by a correctness rise of at least this share of it


def reward_without_correctness(rewards: list[float], correct: list[float]) -> str | None:
    """A warning when reward/mean rose while reward/correct did not keep up, else None.

    Compares the means of the first and the last fifth of the steps: a reward rise of at least
    SHAPING_MIN_RISE with a correctness rise below SHAPING_SHARE of it means a shaping term (a format
    bonus, a length term) is what the policy is learning.
    """
    n = min(len(rewards), len(correct))
    if n < SHAPING_MIN_STEPS:
        return None
    k = max(2, n // 5)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    r0, r1 = mean(rewards[:k]), mean(rewards[n - k : n])
    c0, c1 = mean(correct[:k]), mean(correct[n - k : n])
    if r1 - r0 < SHAPING_MIN_RISE or c1 - c0 >= SHAPING_SHARE * (r1 - r0):
        return None
    return (
        f"reward/mean rose {r0:.3f} → {r1:.3f} (first → last fifth of {n} steps) while reward/correct "
        f"went {c0:.3f} → {c1:.3f}: the policy is learning a shaping term, not the task (check "
        "task.format_reward and the reward's parts in samples.jsonl)"
    )


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl's readable records (dicts with a step), in file order, and a problem line for
    unreadable ones (a torn last write)."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad.append(number)
    problems = []
    if bad:
        problems.append(
            f"metrics.jsonl: {len(bad)} unreadable line(s) (first: line {bad[0]}; truncated write?)"
        )
    if not records:
        problems.append("metrics.jsonl has no readable records")
    return records, problems


def run_summary(rows: list[Mapping[str, Any]], task: str) -> str | None:
    """The line a finished run ends with, from its metrics.jsonl rows (a resumed run's whole history):
    held-out accuracy at its first and last evaluation, and the training reward of the first and the
    last fifth of the steps (the step-0 baseline and the rise are what tell learning from noise)."""
    key = f"eval/{task}/accuracy"
    evals = sorted((row["step"], row[key]) for row in rows if row.get(key) is not None)
    rewards = [
        row["reward/mean"]
        for row in sorted(rows, key=lambda r: r["step"])
        if row.get("reward/mean") is not None
    ]
    parts = []
    if len(evals) == 1:
        parts.append(f"held-out {key} {evals[0][1]:.3f} (step {evals[0][0]})")
    elif evals:
        (s0, a0), (s1, a1) = evals[0], evals[-1]
        parts.append(f"held-out {key} {a0:.3f} (step {s0}) → {a1:.3f} (step {s1}): {a1 - a0:+.3f}")
    if len(rewards) >= 2:
        n, k = len(rewards), max(1, len(rewards) // 5)
        r0, r1 = sum(rewards[:k]) / k, sum(rewards[n - k :]) / k
        parts.append(f"reward/mean {r0:.3f} → {r1:.3f} (first → last fifth of {n} steps): {r1 - r0:+.3f}")
    return "; ".join(parts) or None


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        *,
        config: Mapping[str, Any],
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.every = max(1, total_steps // 20)
        self.warned: set[str] = set()
        self.reward_history: tuple[list[float], list[float]] = ([], [])
        self.wandb = None
        self.progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.samples_file = (run_dir / "samples.jsonl").open("a", encoding="utf-8")
        if cfg.name == "wandb" and cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.project, mode=cfg.mode, dir=str(run_dir), config=dict(config), resume="allow"
            )
        if cfg.console:
            self.console = Console(stderr=True)
            self.progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task_id = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        if "reward/mean" in metrics and "reward/correct" in metrics:
            self.reward_history[0].append(float(metrics["reward/mean"]))
            self.reward_history[1].append(float(metrics["reward/correct"]))
            if "shaping" not in self.warned and (message := reward_without_correctness(*self.reward_history)):
                self.warn_once("shaping", message)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)
        reward, speed = (
            metrics.get("reward/mean", float("nan")),
            metrics.get("perf/tokens_per_s", float("nan")),
        )
        if self.progress is not None:
            self.progress.update(
                self.task_id, completed=step, description=f"reward {reward:.3f}  {speed:,.0f} tok/s"
            )
        if step % self.every == 0 or step == self.total_steps:
            shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics)
            evals = "  ".join(
                f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/") and k.endswith("accuracy")
            )
            log.info("step %d/%d  %s  %s", step, self.total_steps, shown, evals)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.enabled:
            for row in rows:
                self.samples_file.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
            self.samples_file.flush()

    def write_eval(self, step: int, metrics: Mapping[str, float], task: str) -> None:
        """eval.json: the evaluation metrics of `task` at `step` (the final ones), without their prefix."""
        prefix = f"eval/{task}/"
        found = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        (self.run_dir / "eval.json").write_text(
            json.dumps({"task": task, "step": step, "metrics": found}, indent=2)
        )

    def log_summary(self, task: str) -> None:
        """Log `run_summary` of the whole metrics.jsonl (a resumed run's earlier steps included)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        summary = run_summary(read_metrics(path)[0], task)
        if summary:
            log.info("finished: %s", summary)

    def warn_once(self, kind: str, message: str) -> None:
        if self.enabled and kind not in self.warned:
            self.warned.add(kind)
            log.warning(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()
        self.samples_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_status(run_dir: Path, **fields: Any) -> None:
    """run.json: status (running | finished | failed | interrupted), names, seed, git SHA, steps, notes.
    Merged into what is there (a field given as None is removed), written atomically."""
    path = run_dir / "run.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    current = {k: v for k, v in current.items() if v is not None}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2))
    tmp.replace(path)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the metrics.jsonl and samples.jsonl rows of steps after `step`, and any torn line.

    A resumed run re-does the steps after its checkpoint; without this they would be logged twice (and
    a run killed mid-write leaves a partial last line). Each file is rewritten atomically.
    """
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            log.info("%s: dropped %d rows after step %d (re-done on resume) or torn", name, dropped, step)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
