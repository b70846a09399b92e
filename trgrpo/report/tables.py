"""`trgrpo report DIR...`: training runs → comparison tables (markdown, CSV) and PNG figures.

Finds run directories (any folder holding `metrics.jsonl` or `run.json`) under the given folders,
groups them by task, algorithm and every other config key that differs between runs (seed, output
paths and logging settings excepted), and writes to `--out`:

- `report.md`: per task × group, final and best eval accuracy, final reward, mean token weight,
  grad-norm mean and step-to-step variance (mean ± 95% t-interval over seeds); paired differences of
  each algorithm against `grpo` over shared seeds; links to the figures; the runs left out and why.
- `report.csv` (the group table) and `report_paired.csv` (the paired differences).
- `figures/*.png` (drawn by `trgrpo/report/plots.py`).

A run enters the statistics only if `run.json` says finished and its files are complete and
readable (reading and grouping: `trgrpo/report/runs.py`). Other runs are listed with the reason;
those with metrics are still drawn in the figures. Nothing here trains or evaluates, and a malformed
run never crashes the report.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trgrpo.report import stats
from trgrpo.report.runs import (
    BASELINE,
    Group,
    Run,
    find_run_dirs,
    group_runs,
    load_run,
    series,
    splitting_keys,
)

FINAL_FRACTION = 0.1  # final reward/mean: mean over this last fraction of logged steps
METRICS = (  # (csv name, markdown header)
    ("start_accuracy", "Start accuracy (step 0)"),
    ("final_accuracy", "Final accuracy"),
    ("accuracy_gain", "Gain over step 0"),
    ("best_accuracy", "Best eval accuracy (training)"),
    ("final_reward", "Final reward/mean"),
    ("weight_mean", "Mean weight"),
    ("grad_norm_mean", "Grad norm mean"),
    ("grad_norm_diff_var", "Var of Δ grad norm"),
)


# ------------------------------------------------------------------------------------- statistics


def final_accuracy(run: Run) -> tuple[float, str]:
    """Final accuracy and its source: eval.json, else the last eval/<task>/accuracy in metrics.jsonl."""
    if run.eval is not None:
        value = (run.eval.get("metrics") or {}).get("accuracy")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), "eval.json"
    _, values = series(run.metrics, f"eval/{run.task}/accuracy")
    if values.size:
        return float(values[-1]), "metrics.jsonl"
    return math.nan, "none"


def run_summary(run: Run) -> dict[str, float]:
    """Per-run numbers of the table; nan where the run did not log what is needed."""
    steps, accuracy = series(run.metrics, f"eval/{run.task}/accuracy")
    trained = accuracy[steps > 0]  # step 0: the initial policy (trainer.eval_at_start)
    _, reward = series(run.metrics, "reward/mean")
    _, grad_norm = series(run.metrics, "train/grad_norm")
    _, weight = series(run.metrics, "weights/mean")
    tail = max(1, math.ceil(FINAL_FRACTION * reward.size))
    start = float(accuracy[0]) if steps.size and steps[0] == 0 else math.nan
    final = final_accuracy(run)[0]
    return {
        "start_accuracy": start,
        "final_accuracy": final,
        "accuracy_gain": final - start,  # per run, so the interval is over each seed's own gain
        "best_accuracy": float(trained.max()) if trained.size else math.nan,
        "final_reward": float(reward[-tail:].mean()) if reward.size else math.nan,
        "weight_mean": float(weight.mean()) if weight.size else math.nan,
        "grad_norm_mean": float(grad_norm.mean()) if grad_norm.size else math.nan,
        # population variance (ddof=0) of step-to-step changes: the paper's smoothness measure
        "grad_norm_diff_var": float(np.var(np.diff(grad_norm))) if grad_norm.size > 1 else math.nan,
    }


def _per_seed(runs: Sequence[Run], metric: str) -> dict[int, float]:
    """seed → value (the mean if a seed was run twice), finite values only."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        value = run_summary(run)[metric]
        if run.seed is not None and math.isfinite(value):
            values[run.seed].append(value)
    return {seed: float(np.mean(v)) for seed, v in sorted(values.items())}


def table_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group with at least one included run: mean, lo, hi and n for each metric."""
    rows = []
    for group in groups:
        runs = group.included
        if not runs:
            continue
        row: dict[str, Any] = {
            "task": group.task,
            "algo": group.algo,
            "group": group.name,
            "extras": ";".join(f"{k}={v}" for k, v in group.extras),
            "runs": len(runs),
            "seeds": " ".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed or 0)),
        }
        for metric, _ in METRICS:
            values = [run_summary(r)[metric] for r in runs]
            finite = [v for v in values if math.isfinite(v)]
            mean, lo, hi = stats.mean_ci_over_seeds(finite)
            row.update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi, f"{metric}_n": len(finite)})
        rows.append(row)
    return rows


def _baselines(group: Group, groups: Sequence[Group]) -> list[Group]:
    """The grpo groups of the same task and non-algo settings (then the same algo settings, if several)."""

    def plain(g: Group) -> tuple[tuple[str, str], ...]:
        return tuple(e for e in g.extras if not e[0].startswith("algo."))

    found = [
        g
        for g in groups
        if g.algo == BASELINE and g.task == group.task and plain(g) == plain(group) and g.included
    ]
    exact = [g for g in found if g.extras == group.extras]
    return exact or found


def paired_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Paired differences (group − grpo baseline) over seeds present in both, per metric."""
    rows = []
    for group in groups:
        if group.algo == BASELINE or not group.included:
            continue
        for base in _baselines(group, groups):
            for metric, _ in METRICS:
                a, b = _per_seed(group.included, metric), _per_seed(base.included, metric)
                mean, lo, hi, n = stats.paired_difference(a, b)
                shared = " ".join(str(s) for s in sorted(set(a) & set(b)))
                rows.append(
                    {"task": group.task, "group": group.name, "baseline": base.name, "metric": metric,
                     "mean_diff": mean, "lo": lo, "hi": hi, "n_pairs": n, "seeds": shared}
                )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ output


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows as CSV; floats written with repr so they read back exactly."""
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _display(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _cell(mean: float, lo: float, hi: float, n: int, runs: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    text = f"{mean:.3f} ± {(hi - lo) / 2:.3f}" if math.isfinite(lo) else f"{mean:.3f} (no CI)"
    return text if n == runs else f"{text} (n={n})"


def _split_text(keys: dict[str, set[str] | None]) -> str:
    parts = [f"`{k}`" + (f" (within {', '.join(sorted(w))})" if w else "") for k, w in keys.items()]
    return ", ".join(parts) or "task and algorithm only"


def _results_section(
    rows: Sequence[dict[str, Any]], keys: dict[str, set[str] | None], runs: Sequence[Run]
) -> list[str]:
    sources = [final_accuracy(r)[1] for r in runs if r.included]
    lines = [
        "## Results",
        "",
        "Mean ± half-width of the 95% t-interval over seeds (no CI with one seed); `(n=…)` when fewer runs "
        "than the row's logged the metric. Final accuracy: from `eval.json` "
        f"(runs: {sources.count('eval.json')}), else the last `eval/<task>/accuracy` in metrics.jsonl "
        f"(runs: {sources.count('metrics.jsonl')}; neither: {sources.count('none')}). Start: the eval at step 0 "
        "(the initial policy). Gain: final − start of each run (an interval that excludes 0 is a rise "
        "beyond the seeds' noise). Best: the highest eval accuracy logged during training (step > 0). "
        f"Final reward: mean of the last {FINAL_FRACTION:.0%} of logged steps. Mean weight: mean over "
        "steps of `weights/mean`, the token weight the loss applied (1 for GRPO and under "
        "`algo.weights.normalize=mean`; above 1 the weights also scale the gradient and its logged norm, "
        "which AdamW cancels in the update except through gradient clipping). Grad norm: before "
        "clipping; Var of Δ: mean over seeds of var(diff(train/grad_norm)), the step-to-step variability "
        "the TR-GRPO paper claims to reduce.",
        "",
        f"Groups are split on: {_split_text(keys)}.",
    ]
    for task in sorted({r["task"] for r in rows}):
        lines += ["", f"### {task}", ""]
        lines.append("| Group | Runs (seeds) | " + " | ".join(h for _, h in METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 2) + "|")
        for row in (r for r in rows if r["task"] == task):
            cells = [
                _cell(row[m], row[f"{m}_lo"], row[f"{m}_hi"], row[f"{m}_n"], row["runs"]) for m, _ in METRICS
            ]
            lines.append(f"| {row['group']} | {row['runs']} ({row['seeds']}) | " + " | ".join(cells) + " |")
    return lines


def _paired_section(paired: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["", f"## Paired differences against {BASELINE}", ""]
    if not paired:
        return [*lines, f"No group has a `{BASELINE}` counterpart with shared seeds."]
    lines += [
        "Difference (group − baseline) per seed present in both, mean ± half-width of the 95% t-interval.",
        "",
        "| Task | Group | Baseline | Metric | Difference | Seeds paired |",
        "|---|---|---|---|---|---|",
    ]
    for row in paired:
        cell = _cell(row["mean_diff"], row["lo"], row["hi"], row["n_pairs"], row["n_pairs"])
        lines.append(
            f"| {row['task']} | {row['group']} | {row['baseline']} | {row['metric']} | {cell} "
            f"| {row['n_pairs']} ({row['seeds']}) |"
        )
    return lines


def _excluded_section(runs: Sequence[Run], root: Path) -> list[str]:
    left_out = [r for r in runs if not r.included]
    lines = ["", "## Runs not included", ""]
    if not left_out:
        return [*lines, "None: every run found is in the tables."]
    lines += [
        "These runs are excluded from every statistic above. Those with metrics are still drawn in the "
        "figures (so curves may include unfinished runs).",
        "",
        "| Run | Task/algo | Seed | In figures | Reason |",
        "|---|---|---|---|---|",
    ]
    for run in left_out:
        reason = "; ".join(run.problems).replace("|", "\\|").replace("\n", " ")
        plotted = "yes" if run.metrics and run.task and run.algo else "no"
        lines.append(
            f"| {_display(run.path, root)} | {run.task}/{run.algo} | {run.seed} | {plotted} | {reason} |"
        )
    return lines


def render_markdown(
    rows: Sequence[dict[str, Any]],
    paired: Sequence[dict[str, Any]],
    runs: Sequence[Run],
    keys: dict[str, set[str] | None],
    figures: Sequence[tuple[str, Path]],
    out: Path,
    roots: Sequence[Path],
) -> str:
    """report.md; run paths are shown relative to the common folder of `roots`."""
    root = Path(os.path.commonpath([r.resolve() for r in roots]))
    shown = root.relative_to(Path.cwd()) if root.is_relative_to(Path.cwd()) else root  # no home paths
    included = sum(r.included for r in runs)
    lines = [
        "# trgrpo report",
        "",
        f"{len(runs)} runs found under `{shown}`; {included} in the tables, {len(runs) - included} "
        "not included (listed at the end).",
        "",
        *_results_section(rows, keys, runs),
        *_paired_section(paired),
        "",
        "## Figures",
        "",
    ]
    for caption, path in figures:
        lines += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]
    lines += _excluded_section(runs, root)
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trgrpo report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "dirs", nargs="+", help="run directories or folders holding them (searched recursively)"
    )
    parser.add_argument("--out", help="output folder (default: the first DIR)")
    parser.add_argument(
        "--format",
        choices=("md", "csv", "both"),
        default="both",
        help="md: report.md and figures; csv: tables",
    )
    parser.add_argument(
        "--smooth", type=int, default=10, help="moving-average window of the curves, in steps"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trgrpo report`; returns the process exit status."""
    args = _parser().parse_args(argv)
    roots = [Path(d) for d in args.dirs]
    if missing := [str(r) for r in roots if not r.is_dir()]:
        print(f"trgrpo report: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = [load_run(path) for path in find_run_dirs(roots)]
    if not runs:
        print(
            f"trgrpo report: no run directory (metrics.jsonl or run.json) under {', '.join(args.dirs)}",
            file=sys.stderr,
        )
        return 1
    out = Path(args.out) if args.out else roots[0]
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows, paired = table_rows(groups), paired_rows(groups)
    written = []
    if args.format in ("csv", "both"):
        write_csv(rows, out / "report.csv")
        write_csv(paired, out / "report_paired.csv")
        written += [out / "report.csv", out / "report_paired.csv"]
    if args.format in ("md", "both"):
        from trgrpo.report.plots import write_figures

        figures = write_figures(groups, out / "figures", smooth=args.smooth)
        (out / "report.md").write_text(
            render_markdown(rows, paired, runs, splitting_keys(runs), figures, out, roots)
        )
        written += [out / "report.md", *(path for _, path in figures)]
    included = sum(r.included for r in runs)
    print(f"trgrpo report: {len(runs)} runs ({included} in the tables, {len(runs) - included} not included)")
    print("\n".join(f"  wrote {p}" for p in written))
    return 0
