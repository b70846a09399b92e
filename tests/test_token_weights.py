"""Token weights w = f(p) (ALGORITHMS.md, 'TR-GRPO'): reference values, shapes, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.algo.token_weights import (
    SHAPES,
    mean_scale,
    normalize_weights,
    token_weights,
    weight_curve,
    weight_stats,
)


def _logp(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_sigmoid_reference_values_with_defaults():
    # w = clip(2·(σ(9p) − 0.25), 1, 1.4)
    # p = 0.12: σ(1.08) = 0.74649 → 0.99299 → clipped to 1.0
    # p = 0.2:  σ(1.8) = 0.85815 → 2·0.60815 = 1.2162979
    # p = 0.3:  σ(2.7) = 0.93703 → 2·0.68703 = 1.3740533
    # p = 0.33: σ(2.97) = 0.95120 → 1.40240 → clipped to 1.4
    probs = [0.0, 0.05, 0.12, 0.2, 0.3, 0.33, 0.5, 1.0]
    w = token_weights(_logp(probs), shape="sigmoid")
    expected = torch.tensor([1.0, 1.0, 1.0, 1.2162979, 1.3740533, 1.4, 1.4, 1.4])
    torch.testing.assert_close(w, expected, rtol=0, atol=2e-6)
    assert w.dtype == torch.float32


def test_sigmoid_weight_curve_at_reference_points():
    curve = weight_curve([0.0, 0.12, 0.2, 0.3, 0.33, 1.0], shape="sigmoid")
    assert isinstance(curve, list)
    assert all(isinstance(v, float) for v in curve)
    expected = [1.0, 1.0, 1.2162979, 1.3740533, 1.4, 1.4]
    assert curve == pytest.approx(expected, abs=2e-6)


def test_literal_tau_9_is_identically_one():
    # σ(p/9) ∈ [0.5, 0.5277] on [0, 1] → 2·(σ − 0.25) ∈ [0.5, 0.555] → always clipped up to L = 1.
    probs = torch.linspace(0.0, 1.0, 101)
    w = token_weights(probs.log(), shape="sigmoid", tau=9.0)
    assert torch.equal(w, torch.ones(101))


def test_sigmoid_is_nondecreasing_and_reverse_is_nonincreasing():
    probs = torch.linspace(0.0, 1.0, 201)
    sig = token_weights(probs.log(), shape="sigmoid")
    rev = token_weights(probs.log(), shape="reverse")
    assert (sig.diff() >= 0).all()
    assert (rev.diff() <= 0).all()
    assert sig[-1] - sig[0] == pytest.approx(0.4, abs=1e-6)  # from L to U
    assert rev[0] - rev[-1] == pytest.approx(0.4, abs=1e-6)


def test_reverse_is_sigmoid_mirrored():
    # reverse(p) = clip(2·(σ(9(1 − p)) − 0.25), 1, 1.4) = sigmoid(1 − p); p = 0.8 ↔ 0.2 → 1.2162979
    probs = [0.0, 0.5, 0.7, 0.8, 0.9, 1.0]
    rev = token_weights(_logp(probs), shape="reverse")
    mirrored = token_weights(_logp([1.0 - p for p in probs]), shape="sigmoid")
    torch.testing.assert_close(rev, mirrored, rtol=0, atol=1e-6)
    assert rev[3].item() == pytest.approx(1.2162979, abs=2e-6)
    assert rev[-1].item() == 1.0


def test_linear_at_a_few_probabilities():
    # α·p + 1 − α with α = 0.25: p = 0 → 0.75; 0.5 → 0.875; 0.8 → 0.95; 1 → 1.0
    w = token_weights(_logp([0.0, 0.5, 0.8, 1.0]), shape="linear", alpha=0.25)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.875, 0.95, 1.0]), rtol=0, atol=1e-6)
    assert weight_curve([0.5], shape="linear", alpha=0.3) == [pytest.approx(0.85, abs=1e-6)]


def test_none_is_ones():
    logprobs = torch.randn(3, 5).clamp(max=0.0)
    w = token_weights(logprobs, shape="none")
    assert w.dtype == torch.float32
    assert torch.equal(w, torch.ones(3, 5))


def test_unknown_shape_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        token_weights(torch.zeros(1, 2), shape="cosine")
    for name in SHAPES:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        weight_curve([0.5], shape="cosine")


@pytest.mark.parametrize("shape", SHAPES)
def test_no_gradient_flows_through_weights(shape):
    logprobs = torch.tensor([[-0.1, -1.5, -3.0]], dtype=torch.float64, requires_grad=True)
    w = token_weights(logprobs, shape=shape, alpha=0.25 if shape == "linear" else 2.0)
    assert not w.requires_grad
    assert w.grad_fn is None
    assert w.dtype == torch.float32
    assert w.shape == (1, 3)


def test_weights_bf16_input_computed_in_float32():
    w = token_weights(torch.tensor([[math.log(0.2)]], dtype=torch.bfloat16), shape="sigmoid")
    assert w.dtype == torch.float32


def test_weight_stats_values():
    weights = torch.tensor([[1.0, 1.2, 1.4], [1.4, 1.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    stats = weight_stats(weights, mask, lower=1.0, upper=1.4)
    # over 5 tokens: mean = 6/5 = 1.2; deviations −.2, 0, .2, .2, −.2 → var = .16/5 = .032
    assert stats["weights/mean"] == pytest.approx(1.2, abs=1e-6)
    assert stats["weights/std"] == pytest.approx(math.sqrt(0.032), abs=1e-6)
    assert stats["weights/min"] == pytest.approx(1.0, abs=1e-7)
    assert stats["weights/max"] == pytest.approx(1.4, abs=1e-6)  # 99 is padding
    assert stats["weights/frac_lower"] == pytest.approx(0.4, abs=1e-7)
    assert stats["weights/frac_upper"] == pytest.approx(0.4, abs=1e-7)
    assert stats["weights/constant"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


def test_weight_stats_constant_flag():
    weights = torch.ones(2, 4)
    weights[1, 3] = 7.0  # padding: must not break constancy
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    stats = weight_stats(weights, mask, lower=1.0, upper=1.4)
    assert stats["weights/constant"] == 1.0
    assert stats["weights/std"] == 0.0
    assert stats["weights/frac_lower"] == 1.0
    assert stats["weights/frac_upper"] == 0.0


def test_weight_stats_with_sigmoid_weights_clipped_share():
    # p = 0.05, 0.2, 0.9: weights 1.0, 1.2163, 1.4 → one at L, one at U
    w = token_weights(_logp([[0.05, 0.2, 0.9]]), shape="sigmoid")
    stats = weight_stats(w, torch.ones(1, 3, dtype=torch.bool), lower=1.0, upper=1.4)
    assert stats["weights/frac_lower"] == pytest.approx(1 / 3, abs=1e-7)
    assert stats["weights/frac_upper"] == pytest.approx(1 / 3, abs=1e-7)


# ------------------------------------------------------------------ normalize: mean (w / mean w)


def test_mean_normalisation_by_hand():
    # weights 1, 1.4, 1.4 (99 is padding): mean 3.8 / 3 = 1.2666667
    # → 1 / 1.2666667 = 0.7894737, 1.4 / 1.2666667 = 1.1052632; their mean is exactly 1
    weights = torch.tensor([[1.0, 1.4], [1.4, 99.0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = normalize_weights(weights, mask)
    torch.testing.assert_close(out[mask], torch.tensor([0.7894737, 1.1052632, 1.1052632]), rtol=0, atol=1e-6)
    assert out[mask].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_mean_normalisation_with_the_global_sum_and_count():
    # the learner passes the optimizer step's sums: 5.0 over 4 tokens → mean 1.25 → 1 → 0.8, 1.4 → 1.12
    weights = torch.tensor([[1.0, 1.4]])
    out = normalize_weights(weights, torch.ones(1, 2, dtype=torch.bool), weight_sum=5.0, tokens=4.0)
    torch.testing.assert_close(out, torch.tensor([[0.8, 1.12]]), rtol=0, atol=1e-6)


def test_mean_scale_by_hand_and_its_edge_cases():
    assert mean_scale(3.8, 3.0) == pytest.approx(3 / 3.8, rel=1e-12)  # 0.7894737
    assert mean_scale(0.0, 0.0) == 1.0  # no token: nothing to normalise
    assert mean_scale(0.0, 5.0) == 1.0  # every weight 0: no mean to divide by (the loss is 0 anyway)


def test_weight_stats_of_normalised_weights_keep_the_raw_scale():
    # raw 1, 1.4, 1.4: mean 1.2666667, population std sqrt(0.32)/3 = 0.1885618; scale 1/1.2666667
    # → mean 1, std 0.1885618/1.2666667 = 0.1488646, min 0.7894737, max 1.1052632; the shares at the
    # clip bounds are of the raw weights (1 of 3 at L = 1, 2 of 3 at U = 1.4)
    raw = torch.tensor([[1.0, 1.4, 1.4]])
    stats = weight_stats(raw, torch.ones(1, 3, dtype=torch.bool), lower=1.0, upper=1.4, scale=3 / 3.8)
    assert stats["weights/mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["weights/std"] == pytest.approx(0.1488646, abs=1e-6)
    assert stats["weights/min"] == pytest.approx(0.7894737, abs=1e-6)
    assert stats["weights/max"] == pytest.approx(1.1052632, abs=1e-6)
    assert stats["weights/raw_mean"] == pytest.approx(1.2666667, abs=1e-6)
    assert stats["weights/frac_lower"] == pytest.approx(1 / 3, abs=1e-7)
    assert stats["weights/frac_upper"] == pytest.approx(2 / 3, abs=1e-7)
    assert stats["weights/constant"] == 0.0
    plain = weight_stats(raw, torch.ones(1, 3, dtype=torch.bool), lower=1.0, upper=1.4)
    assert plain["weights/raw_mean"] == plain["weights/mean"] == pytest.approx(1.2666667, abs=1e-6)
