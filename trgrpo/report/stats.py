"""Statistics for evaluation and reports: pass@k, bootstrap and t confidence intervals, paired differences.

Pure functions over numbers and numpy arrays; no model, config or file objects. Two kinds of
uncertainty are used and never mixed:

- over **prompts** (one run's evaluation): a percentile bootstrap of the mean over prompts
  (`bootstrap_ci`, `summarize`);
- over **seeds** (several runs of one configuration): a Student-t interval (`mean_ci_over_seeds`,
  `paired_difference`). scipy is not a dependency, so the 97.5% t quantiles are a table for
  df = 1..30 (exact to 1e-12) and a Cornish–Fisher expansion beyond (error < 2e-6 at df = 31).

The module does not read runs or draw anything; `trgrpo/report/tables.py` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30.
_T975 = (
    12.706204736174694, 4.302652729749462, 3.1824463052837086, 2.7764451051977934,
    2.5705818356363146, 2.4469118511449692, 2.364624251592785, 2.3060041352041662,
    2.262157162798205, 2.2281388519862744, 2.2009851600916392, 2.1788128296672284,
    2.160368656462792, 2.1447866879178035, 2.131449545559775, 2.119905299221254,
    2.1098155778333165, 2.1009220402410382, 2.093024054408309, 2.0859634472658644,
    2.07961384472768, 2.073873067904026, 2.068657610419048, 2.0638985616280254,
    2.0595385527532972, 2.0555294386428726, 2.051830516480285, 2.0484071417952445,
    2.045229642132704, 2.0422724563012378,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms the large binomials (Chen et al.,
    "Evaluating Large Language Models Trained on Code", 2021).
    """
    if k > n:
        raise ValueError(
            f"pass@{k} needs at least {k} samples per prompt, got n={n}: eval.ks must be ≤ eval.n"
        )
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k} (eval.ks)")
    if not 0 <= c <= n:
        raise ValueError(f"correct count c={c} must be within [0, n={n}]")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per item, e.g. per prompt).

    Items are resampled with replacement `resamples` times; deterministic for a given seed. An empty
    input gives (nan, nan).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return math.nan, math.nan
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _metric(out: dict[str, Any], name: str, per_prompt: np.ndarray, resamples: int, seed: int) -> None:
    out[name] = float(per_prompt.mean())
    out[f"{name}_ci"] = list(bootstrap_ci(per_prompt, resamples=resamples, seed=seed))


def summarize(
    correct: np.ndarray,
    greedy: np.ndarray | None = None,
    *,
    ks: Sequence[int] = (1,),
    levels: Sequence[str] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluation summary with 95% bootstrap intervals over prompts.

    correct [P, n]: 1/True where sample j of prompt i is correct. greedy [P] or None: greedy answers.
    Returns "accuracy" (greedy, when given), f"avg@{n}", f"pass@{k}" for each k (the mean over prompts
    of the unbiased per-prompt estimator), each with a "<name>_ci" [lo, hi]; "prompts", "samples";
    and "by_level" {level: the same without "by_level"} when `levels` ([P] labels) is given.
    """
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"correct must be [P, n] with P ≥ 1, got shape {correct.shape}")
    prompts, n = correct.shape
    out: dict[str, Any] = {"prompts": prompts, "samples": n}
    if greedy is not None:
        greedy = np.asarray(greedy, dtype=np.float64).reshape(-1)
        if greedy.shape[0] != prompts:
            raise ValueError(f"greedy has {greedy.shape[0]} entries for {prompts} prompts")
        _metric(out, "accuracy", greedy, resamples, seed)
    _metric(out, f"avg@{n}", correct.mean(axis=1), resamples, seed)
    counts = correct.sum(axis=1).round().astype(int)
    for k in ks:
        per_prompt = np.array([pass_at_k(n, int(c), int(k)) for c in counts])
        _metric(out, f"pass@{k}", per_prompt, resamples, seed)
    if levels is not None:
        labels = np.asarray(list(levels), dtype=object)
        if labels.shape[0] != prompts:
            raise ValueError(f"levels has {labels.shape[0]} entries for {prompts} prompts")
        out["by_level"] = {}
        for level in sorted(set(labels.tolist()), key=str):
            mask = labels == level
            sub_greedy = None if greedy is None else greedy[mask]
            out["by_level"][level] = summarize(
                correct[mask], sub_greedy, ks=ks, resamples=resamples, seed=seed
            )
    return out


def mean_ci_over_seeds(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval over seeds: (mean, lo, hi).

    Uses the sample standard deviation (ddof=1). One value gives (v, nan, nan); none gives nans.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, float, int]:
    """Mean of a[s] − b[s] over the seeds s present in both, its 95% t interval, and the pair count."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, lo, hi = mean_ci_over_seeds(diffs)
    return mean, lo, hi, len(seeds)


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of the same length; the first window−1 points average what exists."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if window <= 1 or x.size == 0:
        return x.copy()
    sums = np.cumsum(np.concatenate([[0.0], x]))
    ends = np.arange(1, x.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)
