"""pass@k against brute force, bootstrap and t intervals, summarize on a hand-computed table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from trgrpo.report.stats import (
    bootstrap_ci,
    mean_ci_over_seeds,
    moving_average,
    paired_difference,
    pass_at_k,
    summarize,
    t_quantile_975,
)

T2 = 4.302652729749462  # t_{0.975} with 2 degrees of freedom
T3 = 3.1824463052837086  # … with 3


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases() -> None:
    for n in range(1, 10):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
        for c in range(n + 1):
            assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-9)  # no overflow with large n


def test_pass_at_k_rejects_k_above_n_naming_the_fields() -> None:
    with pytest.raises(ValueError, match=r"eval\.ks must be ≤ eval\.n"):
        pass_at_k(4, 2, 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_bootstrap_ci_contains_mean_is_deterministic_and_shrinks() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(20)
    large = rng.random(2000)
    lo, hi = bootstrap_ci(small, seed=3)
    assert lo < small.mean() < hi
    assert bootstrap_ci(small, seed=3) == (lo, hi)
    assert bootstrap_ci(small, seed=4) != (lo, hi)
    lo_large, hi_large = bootstrap_ci(large, seed=3)
    assert lo_large < large.mean() < hi_large
    assert hi_large - lo_large < (hi - lo) / 3  # width ~ 1/sqrt(items): 10x the items, ~1/3.2 the width
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_ci_level_orders_intervals() -> None:
    values = np.arange(50, dtype=float)
    lo90, hi90 = bootstrap_ci(values, level=0.9, seed=0)
    lo99, hi99 = bootstrap_ci(values, level=0.99, seed=0)
    assert lo99 < lo90 < values.mean() < hi90 < hi99


def test_summarize_on_hand_computed_table() -> None:
    correct = np.array(
        [
            [1, 1, 1, 1],  # c = 4
            [1, 0, 0, 0],  # c = 1
            [0, 0, 0, 0],  # c = 0
            [1, 1, 0, 0],  # c = 2
        ],
        dtype=bool,
    )
    greedy = np.array([1, 0, 0, 1])
    out = summarize(correct, greedy, ks=(1, 2, 4), levels=["a", "b", "b", "a"], resamples=500, seed=0)
    assert out["prompts"] == 4 and out["samples"] == 4
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["avg@4"] == pytest.approx((1 + 0.25 + 0 + 0.5) / 4)
    assert out["pass@1"] == pytest.approx(out["avg@4"])
    # pass@2 per prompt: 1, 1 − C(3,2)/C(4,2) = 1/2, 0, 1 − C(2,2)/C(4,2) = 5/6
    assert out["pass@2"] == pytest.approx((1 + 0.5 + 0 + 5 / 6) / 4)
    assert out["pass@4"] == pytest.approx(3 / 4)
    for name in ("accuracy", "avg@4", "pass@1", "pass@2", "pass@4"):
        lo, hi = out[f"{name}_ci"]
        assert 0.0 <= lo <= out[name] <= hi <= 1.0
    a, b = out["by_level"]["a"], out["by_level"]["b"]
    assert a["prompts"] == 2 and b["prompts"] == 2
    assert a["accuracy"] == 1.0 and b["accuracy"] == 0.0
    assert a["avg@4"] == pytest.approx(0.75) and b["avg@4"] == pytest.approx(0.125)
    assert a["pass@2"] == pytest.approx((1 + 5 / 6) / 2) and b["pass@2"] == pytest.approx(0.25)
    assert a["accuracy_ci"] == [1.0, 1.0]
    assert "by_level" not in a


def test_summarize_without_greedy_and_bad_shapes() -> None:
    out = summarize(np.ones((3, 2)), ks=(2,))
    assert "accuracy" not in out and out["pass@2"] == 1.0 and out["avg@2"] == 1.0
    with pytest.raises(ValueError, match=r"eval\.ks"):
        summarize(np.ones((3, 2)), ks=(4,))
    with pytest.raises(ValueError, match="greedy"):
        summarize(np.ones((3, 2)), np.ones(2))


def test_mean_ci_over_seeds_is_a_t_interval() -> None:
    mean, lo, hi = mean_ci_over_seeds([0.5, 0.6, 0.7])
    half = T2 * 0.1 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((0.6, 0.6 - half, 0.6 + half), rel=1e-12)
    mean, lo, hi = mean_ci_over_seeds([1.0, 2.0, 3.0, 6.0])
    half = T3 * math.sqrt(14 / 3) / 2  # sample variance ((−2)² + 1² + 0² + 3²) / 3
    assert (mean, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-12)
    single = mean_ci_over_seeds([0.25])
    assert single[0] == 0.25 and math.isnan(single[1]) and math.isnan(single[2])
    assert all(math.isnan(v) for v in mean_ci_over_seeds([]))


def test_t_quantiles_table_and_expansion() -> None:
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4)  # expansion continues the table
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_quantile_975(10**6) == pytest.approx(1.95996, abs=1e-4)
    values = [t_quantile_975(df) for df in range(1, 200)]
    assert all(a > b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_difference_hand_computed() -> None:
    a = {0: 0.6, 1: 0.8, 2: 0.7, 7: 0.9}  # seed 7 has no partner
    b = {0: 0.5, 1: 0.6, 2: 0.7, 5: 0.1}
    mean, lo, hi, n = paired_difference(a, b)
    half = T2 * 0.1 / math.sqrt(3)  # diffs 0.1, 0.2, 0.0: mean 0.1, sample std 0.1
    assert n == 3
    assert (mean, lo, hi) == pytest.approx((0.1, 0.1 - half, 0.1 + half), rel=1e-9)
    mean, lo, hi, n = paired_difference({0: 1.0}, {1: 1.0})
    assert n == 0 and math.isnan(mean)


def test_moving_average_trailing_with_partial_start() -> None:
    out = moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2)
    np.testing.assert_allclose(out, [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([1.0, 3.0, 2.0], 10), [1.0, 2.0, 2.0])
    np.testing.assert_allclose(moving_average([1.0, 3.0], 1), [1.0, 3.0])
