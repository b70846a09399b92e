"""PNG figures of `trgrpo report`: training curves, grad-norm trajectories, token weights, p-buckets.

One figure per task and kind, one line (or bar) per run group; curves are the mean over seeds of the
moving-averaged per-run series, with a min–max band over seeds. Drawn with matplotlib's object API on
the Agg canvas (no pyplot, no global backend switch, no display needed). Runs left out of the report's
statistics (failed, running, damaged) are drawn too when they have metrics.

This module only draws: reading runs is `trgrpo/report/runs.py`, the tables `trgrpo/report/tables.py`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trgrpo.report.runs import series
from trgrpo.report.stats import moving_average

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from trgrpo.report.runs import Group

DPI = 100
BUCKET_FIELDS = (
    ("token_share", "share of tokens"),
    ("grad_share", "share of gradient"),
    ("weight_mean", "mean weight"),
)


def _over_seeds(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step: mean, min and max over the runs that logged that step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for steps, values in curves:
        for step, value in zip(steps.tolist(), values.tolist()):
            by_step[step].append(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    stacks = [by_step[s] for s in steps.tolist()]
    return (
        steps,
        np.array([np.mean(v) for v in stacks]),
        np.array([np.min(v) for v in stacks]),
        np.array([np.max(v) for v in stacks]),
    )


def _curves(group: Group, key: str, smooth: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for run in group.runs:
        steps, values = series(run.metrics, key)
        if steps.size:
            out.append((steps, moving_average(values, smooth)))
    return out


def _label(group: Group, curves: Sequence[Any]) -> str:
    left_out = sum(1 for r in group.runs if r.metrics and not r.included)
    return f"{group.name} (n={len(curves)}" + (f", {left_out} not in tables)" if left_out else ")")


def _draw_mean_band(
    ax: Axes, groups: Sequence[Group], key: str, smooth: int, marker: str | None = None
) -> bool:
    drawn = False
    for group in groups:
        curves = _curves(group, key, smooth)
        if not curves:
            continue
        steps, mean, lo, hi = _over_seeds(curves)
        (line,) = ax.plot(steps, mean, marker=marker, label=_label(group, curves))
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    return drawn


def _figure(
    nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.0), sharey: bool = False
) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def reward_parts(groups: Sequence[Group]) -> list[str]:
    """The reward's logged parts (reward/correct, reward/format, ...), in a stable order."""
    keys = {
        key
        for group in groups
        for run in group.runs
        for record in run.metrics
        for key in record
        if key.startswith("reward/") and key not in ("reward/mean", "reward/std")
    }
    return sorted(keys, key=lambda k: (k != "reward/correct", k))


def plot_reward(groups: Sequence[Group], task: str, smooth: int) -> Figure | None:
    """reward/mean, and beside it each part of the reward: a reward that rises while reward/correct
    does not is a shaping term being learned, and shows here as such."""
    parts = reward_parts(groups)
    fig, axes = _figure(1, 1 + len(parts), size=(6.0, 4.0), sharey=True)
    if not _draw_mean_band(axes[0, 0], groups, "reward/mean", smooth):
        return None
    _finish(axes[0, 0], f"{task}: reward/mean (moving average {smooth}; band: min–max over seeds)", "reward")
    for ax, key in zip(axes[0, 1:], parts):
        _draw_mean_band(ax, groups, key, smooth)
        _finish(ax, f"{task}: {key} (part of the reward)", "mean over samples")
    return fig


def plot_eval_accuracy(groups: Sequence[Group], task: str, smooth: int) -> Figure | None:
    fig, axes = _figure()
    if not _draw_mean_band(axes[0, 0], groups, f"eval/{task}/accuracy", 1, marker="o"):
        return None
    _finish(axes[0, 0], f"{task}: eval accuracy during training (band: min–max over seeds)", "accuracy")
    return fig


def plot_grad_norm(groups: Sequence[Group], task: str, smooth: int) -> Figure | None:
    """One panel per group, shared y: every seed's raw trajectory, and the smoothed mean over seeds."""
    drawn = [(g, _curves(g, "train/grad_norm", 1)) for g in groups]
    drawn = [(g, c) for g, c in drawn if c]
    if not drawn:
        return None
    fig, axes = _figure(len(drawn), 1, size=(8.0, 2.6), sharey=True)
    for ax, (group, curves) in zip(axes[:, 0], drawn):
        for steps, values in curves:
            ax.plot(steps, values, linewidth=0.7, alpha=0.45, color="tab:gray")
        steps, mean, _, _ = _over_seeds(curves)
        ax.plot(steps, moving_average(mean, smooth), color="tab:blue", label=f"mean over seeds (MA {smooth})")
        _finish(ax, f"{task}: train/grad_norm, {_label(group, curves)}; gray: each seed", "grad norm")
    return fig


def plot_weights(groups: Sequence[Group], task: str, smooth: int) -> Figure | None:
    """weights/mean per group (mean over seeds), band from the mean over seeds of weights/min and /max."""
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn = False
    for group in groups:
        curves = _curves(group, "weights/mean", smooth)
        if not curves:
            continue
        steps, mean, _, _ = _over_seeds(curves)
        (line,) = ax.plot(steps, mean, label=_label(group, curves))
        low_steps, low, _, _ = _over_seeds(_curves(group, "weights/min", smooth))
        high_steps, high, _, _ = _over_seeds(_curves(group, "weights/max", smooth))
        if low.size and high.size and np.array_equal(low_steps, high_steps):
            ax.fill_between(low_steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        return None
    _finish(ax, f"{task}: token weights (line: weights/mean; band: weights/min–max)", "token weight")
    return fig


def _bucket_names(groups: Sequence[Group]) -> list[str]:
    names = {
        key.split("/")[1]
        for g in groups
        for r in g.runs
        for rec in r.metrics
        for key in rec
        if key.startswith("buckets/") and key.count("/") == 2
    }

    def lower_edge(name: str) -> float:
        try:
            return float(name.lstrip("p").split("-")[0])
        except ValueError:
            return math.inf

    return sorted(names, key=lambda n: (lower_edge(n), n))


def _run_average(group: Group, key: str) -> float:
    """Mean over runs of each run's mean over steps (nan when no run logged `key`)."""
    means = [values.mean() for _, values in _curves(group, key, 1) if values.size]
    return float(np.mean(means)) if means else math.nan


def bucket_weight_mean(group: Group, bucket: str) -> float:
    """Mean token weight in a probability bucket over all runs and steps, each step counted by its
    tokens in the bucket (token_share × train/tokens): a step with an empty bucket logs 0.0, which
    must not count. nan when no run has a token there."""
    total = weighted = 0.0
    for run in group.runs:
        rows = [
            (
                r.get(f"buckets/{bucket}/token_share"),
                r.get(f"buckets/{bucket}/weight_mean"),
                r.get("train/tokens"),
            )
            for r in run.metrics
        ]
        for share, mean, tokens in rows:
            if isinstance(share, float) and isinstance(mean, float) and share > 0:
                count = share * (tokens if isinstance(tokens, float) else 1.0)
                total, weighted = total + count, weighted + count * mean
    return weighted / total if total > 0 else math.nan


def plot_buckets(groups: Sequence[Group], task: str, smooth: int) -> Figure | None:
    """Per probability bucket: token share, gradient share and mean weight, averaged over the run."""
    buckets = _bucket_names(groups)
    if not buckets:
        return None
    fig, axes = _figure(1, len(BUCKET_FIELDS), size=(4.5, 3.6))
    x = np.arange(len(buckets))
    width = 0.8 / max(1, len(groups))
    for ax, (field, title) in zip(axes[0], BUCKET_FIELDS):
        for i, group in enumerate(groups):
            if field == "weight_mean":
                heights = [bucket_weight_mean(group, b) for b in buckets]
            else:
                heights = [_run_average(group, f"buckets/{b}/{field}") for b in buckets]
            ax.bar(x + (i - (len(groups) - 1) / 2) * width, heights, width, label=group.name)
        ax.set_xticks(x, buckets)
        ax.set_xlabel("token probability bucket")
        ax.set_title(f"{task}: {title}", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    return fig


PLOTS: tuple[tuple[str, str, Callable[[Sequence[Group], str, int], Figure | None]], ...] = (
    ("reward", "reward/mean and its parts during training", plot_reward),
    ("eval_accuracy", "eval accuracy during training", plot_eval_accuracy),
    ("grad_norm", "train/grad_norm trajectories", plot_grad_norm),
    ("weights", "token-weight distribution", plot_weights),
    ("buckets", "token and gradient share per probability bucket", plot_buckets),
)


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_figures(groups: Sequence[Group], out_dir: Path, *, smooth: int = 10) -> list[tuple[str, Path]]:
    """Draw every figure that has data into out_dir; returns (caption, path) in drawing order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({g.task for g in groups}):
        task_groups = [g for g in groups if g.task == task and any(r.metrics for r in g.runs)]
        for name, caption, plot in PLOTS:
            fig = plot(task_groups, task, smooth) if task_groups else None
            if fig is None:
                continue
            path = out_dir / f"{name}_{_file_safe(task)}.png"
            fig.savefig(path, dpi=DPI)
            written.append((f"{task}: {caption}", path))
    return written
