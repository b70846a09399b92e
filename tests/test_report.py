"""`trgrpo report` on synthetic run directories whose table numbers are known by construction."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from trgrpo.report.tables import main

T2 = 4.302652729749462  # t_{0.975} with 2 degrees of freedom: 3 seeds
STEPS = 20
SEEDS = (0, 1, 2)
# Final eval accuracy per (task, algo), by seed. math/tr_grpo seed 2 has no eval.json: its value
# must come from the last eval/math/accuracy in metrics.jsonl.
FINAL = {
    ("logic", "grpo"): (0.5, 0.6, 0.7),
    ("logic", "tr_grpo"): (0.6, 0.8, 0.7),
    ("math", "grpo"): (0.2, 0.3, 0.4),
    ("math", "tr_grpo"): (0.3, 0.3, 0.6),
}
REWARD_BASE = {
    ("logic", "grpo"): 0.1,
    ("logic", "tr_grpo"): 0.2,
    ("math", "grpo"): 0.3,
    ("math", "tr_grpo"): 0.4,
}
GRAD_HIGH = {"grpo": 3.0, "tr_grpo": 2.0}  # grad norm alternates a·1, a·high with a = 1 + seed
# weights/mean: 1 for grpo; for tr_grpo 1.2 + 0.01·seed on odd steps and + 0.02 more on even ones
BUCKETS = ("p0-0.1", "p0.1-0.5", "p0.5-0.9", "p0.9-1")
FIGURES = {f"{kind}_{task}.png" for kind in ("reward", "eval_accuracy", "grad_norm", "weights", "buckets")
           for task in ("logic", "math")}  # fmt: skip


def _config(task: str, algo: str, seed: int, *, lr: float = 2e-5, alpha: float = 2.0) -> dict[str, Any]:
    return {
        "seed": seed,
        "task": {"name": task, "train_size": 100},
        "algo": {"name": algo, "clip_high": 0.2, "weights": {"shape": "none" if algo == "grpo" else "sigmoid",
                                                             "alpha": alpha}},
        "model": {"name": "tiny", "path": None},
        "trainer": {"steps": STEPS, "lr": lr, "resume": None,
                    "threads": "auto" if algo == "grpo" else seed + 1},  # never splits groups
        "logger": {"name": "jsonl", "project": f"p{seed}"},  # never splits groups
        "eval": {"checkpoint": f"/ckpt/{task}/{algo}/{seed}", "n": 4},  # an output path: ignored
    }  # fmt: skip


def _record(task: str, algo: str, seed: int, step: int, final: float, eval_json: bool) -> dict[str, Any]:
    a = 1.0 + seed
    record: dict[str, Any] = {
        "step": step,
        "reward/mean": REWARD_BASE[(task, algo)] + 0.01 * seed + step / 100,
        "reward/std": 0.3,
        "train/grad_norm": a * (1.0 if step % 2 else GRAD_HIGH[algo]),
        "weights/mean": 1.0 if algo == "grpo" else 1.2 + 0.01 * seed + (0.0 if step % 2 else 0.02),
        "weights/min": 1.0,
        "weights/max": 1.0 if algo == "grpo" else 1.4,
    }
    for bucket, token, grad in zip(BUCKETS, (0.1, 0.2, 0.3, 0.4), (0.4, 0.3, 0.2, 0.1)):
        record[f"buckets/{bucket}/token_share"] = token
        record[f"buckets/{bucket}/grad_share"] = grad
        record[f"buckets/{bucket}/weight_mean"] = 1.0 if algo == "grpo" else 1.0 + token
    if step == 10:
        record[f"eval/{task}/accuracy"] = final + 0.05  # the best during training
    if step == STEPS:  # differs from eval.json where there is one, so the source is checked
        record[f"eval/{task}/accuracy"] = final - 0.1 if eval_json else final
    return record


def _write_run(
    path: Path,
    config: dict[str, Any] | None,
    info: dict[str, Any],
    records: list[dict[str, Any]] | None,
    accuracy: float | None,
) -> None:
    path.mkdir(parents=True)
    if config is not None:
        (path / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    (path / "run.json").write_text(json.dumps({"git_sha": "abc", "steps": STEPS, **info}))
    if records is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if accuracy is not None:
        metrics = {"accuracy": accuracy, "accuracy_ci": [accuracy - 0.1, accuracy + 0.1], "pass@1": accuracy}
        (path / "eval.json").write_text(json.dumps({"task": info["task"], "step": STEPS, "metrics": metrics}))


def _info(task: str, algo: str, seed: int, status: str = "finished", **extra: Any) -> dict[str, Any]:
    return {"status": status, "task": task, "algo": algo, "seed": seed, "last_step": STEPS, **extra}


def _write_sweep(root: Path) -> list[Path]:
    """12 good runs under root/multirun; 3 bad math/grpo runs (seeds 3-5) under root/outputs. Returns
    the bad runs' paths (failed, truncated metrics, missing metrics)."""
    number = 0
    for (task, algo), finals in FINAL.items():
        for seed, final in zip(SEEDS, finals):
            eval_json = (task, algo, seed) != ("math", "tr_grpo", 2)
            records = [_record(task, algo, seed, s, final, eval_json) for s in range(1, STEPS + 1)]
            # step 0 (trainer.eval_at_start): above every later eval, so `best` must skip it
            records.insert(0, {"step": 0, f"eval/{task}/accuracy": final + 0.2, "time/eval": 1.0})
            path = root / "multirun" / "2025-01-01" / "12-00-00" / f"{number}_{task}_{algo}_s{seed}"
            _write_run(
                path,
                _config(task, algo, seed),
                _info(task, algo, seed),
                records,
                final if eval_json else None,
            )
            number += 1
    bad = root / "outputs" / "2025-01-02"
    junk = [_record("math", "grpo", 9, s, 0.0, True) for s in range(1, STEPS + 1)]
    failed, truncated, missing = bad / "failed", bad / "truncated", bad / "no_metrics"
    info = _info("math", "grpo", 3, "failed", error="CUDA out of memory", last_step=5)
    _write_run(failed, _config("math", "grpo", 3), info, junk[:5], None)
    _write_run(truncated, _config("math", "grpo", 4), _info("math", "grpo", 4), junk, 0.0)
    with (truncated / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "reward/me')
    _write_run(missing, _config("math", "grpo", 5), _info("math", "grpo", 5), None, 0.0)
    return [failed, truncated, missing]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and t-interval over 3 seeds, written out so the test does not use trgrpo.report.stats."""
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    return mean, mean - T2 * sd / math.sqrt(3), mean + T2 * sd / math.sqrt(3)


def _check(row: dict[str, str], metric: str, expected: tuple[float, float, float], n: int = 3) -> None:
    got = tuple(float(row[k]) for k in (metric, f"{metric}_lo", f"{metric}_hi"))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (row["group"], metric)
    assert int(row[f"{metric}_n"]) == n


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    bad = _write_sweep(root)
    assert (
        main([str(root / "multirun"), str(root / "outputs"), "--out", str(root / "report"), "--smooth", "3"])
        == 0
    )
    return root / "report", bad


def test_group_table_numbers(report: tuple[Path, list[Path]]) -> None:
    out, _ = report
    rows = {r["group"]: r for r in _read_csv(out / "report.csv")}
    assert list(rows) == ["logic/grpo", "logic/tr_grpo", "math/grpo", "math/tr_grpo"]  # bad runs excluded
    for (task, algo), finals in FINAL.items():
        row = rows[f"{task}/{algo}"]
        assert (row["task"], row["algo"], row["runs"], row["seeds"]) == (task, algo, "3", "0 1 2")
        _check(row, "final_accuracy", _ci(list(finals)))
        _check(row, "best_accuracy", _ci([f + 0.05 for f in finals]))  # step 0 excluded
        _check(row, "start_accuracy", _ci([f + 0.2 for f in finals]))
        _check(row, "accuracy_gain", (-0.2, -0.2, -0.2))  # final − start, per run: −0.2 in every seed
        # last 10% of 20 steps = steps 19 and 20: base + 0.01·seed + 0.195
        _check(row, "final_reward", _ci([REWARD_BASE[(task, algo)] + 0.01 * s + 0.195 for s in SEEDS]))
        high = GRAD_HIGH[algo]
        _check(row, "grad_norm_mean", _ci([(1 + s) * (1 + high) / 2 for s in SEEDS]))
        # mean over 20 steps: 1.2 + 0.01·seed + 0.02/2 = 1.21, 1.22, 1.23 for tr_grpo; 1 for grpo
        weights = [1.0] * 3 if algo == "grpo" else [1.21 + 0.01 * s for s in SEEDS]
        _check(row, "weight_mean", _ci(weights))
        # 19 diffs: 10 × +d, 9 × −d with d = a·(high − 1): mean d/19, var d² − (d/19)²
        diff_var = [((1 + s) * (high - 1)) ** 2 * (1 - 1 / 361) for s in SEEDS]
        _check(row, "grad_norm_diff_var", _ci(diff_var))


def test_paired_differences(report: tuple[Path, list[Path]]) -> None:
    out, _ = report
    rows = {(r["group"], r["metric"]): r for r in _read_csv(out / "report_paired.csv")}
    assert {g for g, _ in rows} == {"logic/tr_grpo", "math/tr_grpo"}
    for task in ("logic", "math"):
        row = rows[(f"{task}/tr_grpo", "final_accuracy")]
        assert row["baseline"] == f"{task}/grpo" and row["n_pairs"] == "3" and row["seeds"] == "0 1 2"
        diffs = [a - b for a, b in zip(FINAL[(task, "tr_grpo")], FINAL[(task, "grpo")])]
        got = tuple(float(row[k]) for k in ("mean_diff", "lo", "hi"))
        assert got == pytest.approx(_ci(diffs), rel=1e-9)
        assert float(row["mean_diff"]) == pytest.approx(0.1)
        row = rows[(f"{task}/tr_grpo", "grad_norm_mean")]
        assert float(row["mean_diff"]) == pytest.approx((1.5 - 2.0) * 2)  # a·(1+high)/2, mean a = 2
        row = rows[(f"{task}/tr_grpo", "weight_mean")]
        assert float(row["mean_diff"]) == pytest.approx(0.22)  # mean of 1.21, 1.22, 1.23 minus 1


def test_markdown_tables_and_excluded_runs(report: tuple[Path, list[Path]]) -> None:
    out, bad = report
    text = (out / "report.md").read_text()
    half = T2 * 0.1 / math.sqrt(3)
    assert f"| logic/grpo | 3 (0 1 2) | 0.800 ± {half:.3f} | 0.600 ± {half:.3f} |" in text  # start, final
    assert f"15 runs found under `{out.parent.resolve()}`; 12 in the tables, 3 not included" in text
    assert "`eval.json` (runs: 11), else the last `eval/<task>/accuracy` in metrics.jsonl (runs: 1;" in text
    assert "Final reward: mean of the last 10% of logged steps" in text and "{" not in text
    header = next(line for line in text.splitlines() if line.startswith("| Group |"))
    assert "| Final reward/mean | Mean weight | Grad norm mean |" in header  # the weight next to grad norm
    # math/tr_grpo: mean weight 1.220 ± T2·0.01/√3, then grad norm 1.5·(1, 2, 3) → 3.000 ± T2·1.5/√3
    assert f"| 1.220 ± {T2 * 0.01 / math.sqrt(3):.3f} | 3.000 ± {T2 * 1.5 / math.sqrt(3):.3f} |" in text
    assert (
        "## Paired differences against grpo" in text
        and "| math | math/tr_grpo | math/grpo | final_accuracy |" in text
    )
    excluded = text[text.index("## Runs not included") :]
    failed, truncated, missing = (f"| {p.relative_to(out.parent)} |" for p in bad)
    rows = {line.split(" | ")[0] + " |": line for line in excluded.splitlines() if line.startswith("| ")}
    assert "failed: CUDA out of memory" in rows[failed] and "| yes |" in rows[failed]
    assert "unreadable line" in rows[truncated] and "line 21" in rows[truncated]
    assert "metrics.jsonl missing" in rows[missing] and "| no |" in rows[missing]


def test_figures_exist_are_pngs_and_are_linked(report: tuple[Path, list[Path]]) -> None:
    out, _ = report
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(link).name for link in links} == FIGURES
    assert {p.name for p in (out / "figures").iterdir()} == FIGURES
    for link in links:
        assert link.startswith("figures/")
        data = (out / link).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", link


def test_groups_split_on_differing_keys_and_pair_within_settings(tmp_path: Path) -> None:
    runs = [("grpo", 1e-5, 2.0), ("grpo", 2e-5, 2.0), ("tr_grpo", 1e-5, 2.0), ("tr_grpo", 1e-5, 3.0)]
    for i, (algo, lr, alpha) in enumerate(runs):
        for seed in (0, 1):
            final = 0.5 + 0.1 * i + 0.01 * seed
            records = [_record("logic", algo, seed, s, final, True) for s in range(1, STEPS + 1)]
            config = _config("logic", algo, seed, lr=lr, alpha=alpha)
            _write_run(tmp_path / f"{i}_{seed}", config, _info("logic", algo, seed), records, final)
    assert main([str(tmp_path), "--format", "csv"]) == 0
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "figures").exists()
    groups = [r["group"] for r in _read_csv(tmp_path / "report.csv")]
    assert groups == [
        "logic/grpo trainer.lr=1e-05",
        "logic/grpo trainer.lr=2e-05",
        "logic/tr_grpo algo.weights.alpha=2.0 trainer.lr=1e-05",
        "logic/tr_grpo algo.weights.alpha=3.0 trainer.lr=1e-05",
    ]
    paired = [r for r in _read_csv(tmp_path / "report_paired.csv") if r["metric"] == "final_accuracy"]
    assert [(r["group"], r["baseline"]) for r in paired] == [
        ("logic/tr_grpo algo.weights.alpha=2.0 trainer.lr=1e-05", "logic/grpo trainer.lr=1e-05"),
        ("logic/tr_grpo algo.weights.alpha=3.0 trainer.lr=1e-05", "logic/grpo trainer.lr=1e-05"),
    ]
    assert [float(r["mean_diff"]) for r in paired] == pytest.approx([0.2, 0.3])
    assert all(r["n_pairs"] == "2" for r in paired)


def test_no_runs_and_missing_dir_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    assert "no run directory" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_bucket_weight_mean_is_token_weighted_and_skips_empty_steps() -> None:
    """A step whose bucket held no token logs weight_mean 0.0: it must not pull the mean down. Steps
    count by their tokens in the bucket: (1.0·0.5·100 + 1.4·0.1·300) / (0.5·100 + 0.1·300) = 1.15."""
    from trgrpo.report.plots import bucket_weight_mean
    from trgrpo.report.runs import Group, Run

    rows = [
        {"step": 1, "train/tokens": 100.0, "buckets/b/token_share": 0.5, "buckets/b/weight_mean": 1.0},
        {"step": 2, "train/tokens": 300.0, "buckets/b/token_share": 0.1, "buckets/b/weight_mean": 1.4},
        {"step": 3, "train/tokens": 200.0, "buckets/b/token_share": 0.0, "buckets/b/weight_mean": 0.0},
    ]

    def group_of(metrics: list[dict[str, Any]]) -> Group:
        run = Run(Path("r"), "t", "a", 0, {}, metrics, None, ())
        return Group("t", "a", (), (run,))

    assert bucket_weight_mean(group_of(rows), "b") == pytest.approx(1.15)
    assert math.isnan(bucket_weight_mean(group_of(rows[2:]), "b"))


def test_reward_figure_puts_each_part_of_the_reward_beside_it() -> None:
    from trgrpo.report.plots import plot_reward, reward_parts
    from trgrpo.report.runs import Group, Run

    # a gamed run: reward rises through its format part while reward/correct stays at 0
    metrics = [
        {
            "step": s,
            "reward/mean": 0.2 * s / 9,
            "reward/std": 0.1,
            "reward/format": s / 9,
            "reward/correct": 0.0,
        }
        for s in range(10)
    ]
    run = Run(Path("r"), "math", "grpo", 0, {}, metrics, None, ())
    group = Group("math", "grpo", (), (run,))
    assert reward_parts([group]) == ["reward/correct", "reward/format"]
    fig = plot_reward([group], "math", 1)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 3 and "reward/correct" in titles[1] and "reward/format" in titles[2]
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.0] * 10
