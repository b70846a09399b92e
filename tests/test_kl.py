"""KL estimators k1/k2/k3 (ALGORITHMS.md, 'GRPO'): hand values, sign, clamp, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.algo.kl import ESTIMATORS, KL_LOG_RATIO_CLAMP, kl_penalty

LN2 = math.log(2.0)


def _pair():
    # row: p = 0.5 vs p_ref = 0.25 (d = ln 2), and p = 0.25 vs p_ref = 0.5 (d = −ln 2)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    return logprobs, ref


def test_hand_values():
    logprobs, ref = _pair()
    # k1 = d = ±0.6931472
    torch.testing.assert_close(kl_penalty(logprobs, ref, estimator="k1"), torch.tensor([[LN2, -LN2]]))
    # k2 = ½ d² = ½·0.4804530 = 0.2402265 for both
    k2 = 0.5 * LN2**2
    torch.testing.assert_close(kl_penalty(logprobs, ref, estimator="k2"), torch.tensor([[k2, k2]]))
    # k3 = exp(−d) + d − 1: d = ln 2 → 0.5 + 0.6931472 − 1 = 0.1931472; d = −ln 2 → 2 − 0.6931472 − 1 = 0.3068528
    k3 = kl_penalty(logprobs, ref, estimator="k3")
    torch.testing.assert_close(k3, torch.tensor([[LN2 - 0.5, 1.0 - LN2]]), rtol=0, atol=1e-6)


def test_default_estimator_is_k3():
    logprobs, ref = _pair()
    assert torch.equal(kl_penalty(logprobs, ref), kl_penalty(logprobs, ref, estimator="k3"))


def test_k3_is_nonnegative_and_zero_on_equal():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 32, generator=g) * 8
    ref = -torch.rand(64, 32, generator=g) * 8
    assert (kl_penalty(logprobs, ref, estimator="k3") >= 0).all()
    assert torch.equal(kl_penalty(ref, ref, estimator="k3"), torch.zeros(64, 32))


def test_k3_clamps_the_log_ratio():
    assert KL_LOG_RATIO_CLAMP == 10.0
    logprobs = torch.tensor([[-50.0, 0.0, -12.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -50.0, -1.0]])
    k3 = kl_penalty(logprobs, ref, estimator="k3")
    # d = −50 → −d clamped to 10: e^10 − 10 − 1 = 22015.4657948
    # d = 50 → −d clamped to −10: e^−10 + 10 − 1 = 9.0000454
    # d = −11 → −d clamped to 10: same as the first
    expected = torch.tensor([[22015.4657948, 9.0000454, 22015.4657948]])
    torch.testing.assert_close(k3, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(k3).all()
    k3.sum().backward()
    # beyond the clamp the estimate is flat: no gradient
    assert torch.equal(logprobs.grad, torch.zeros(1, 3))


def test_gradient_direction_and_values():
    logprobs, ref = _pair()
    logprobs.requires_grad_(True)
    ref.requires_grad_(True)
    for estimator, expected in [
        ("k1", [1.0, 1.0]),  # ∂d/∂log p = 1
        ("k2", [LN2, -LN2]),  # ∂(½d²)/∂log p = d
        ("k3", [0.5, -1.0]),  # ∂k3/∂log p = 1 − exp(−d): 1 − 0.5, 1 − 2
    ]:
        logprobs.grad = None
        kl_penalty(logprobs, ref, estimator=estimator).sum().backward()
        torch.testing.assert_close(logprobs.grad, torch.tensor([[*expected]]), rtol=0, atol=1e-6)
        assert ref.grad is None  # the reference is frozen
    # k2 and k3 pull log p towards log p_ref: descending the gradient lowers d where d > 0, raises it where d < 0


def test_computed_in_float32_and_does_not_modify_inputs():
    logprobs = torch.tensor([[-0.5, -1.0]], dtype=torch.bfloat16)
    ref = torch.tensor([[-0.7, -0.2]], dtype=torch.bfloat16)
    before = (logprobs.clone(), ref.clone())
    for estimator in ESTIMATORS:
        assert kl_penalty(logprobs, ref, estimator=estimator).dtype == torch.float32
    assert torch.equal(logprobs, before[0])
    assert torch.equal(ref, before[1])


def test_unknown_estimator_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), estimator="k4")
    for name in ESTIMATORS:
        assert name in str(err.value)
