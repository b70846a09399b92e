"""Truncated importance sampling (rollout/trainer mismatch correction, ALGORITHMS.md "Log-probs"):
hand values at token and sequence level, the cap, padding, and its place in the policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.algo.losses import policy_loss
from trgrpo.algo.tis import TIS_LEVELS, tis_weights

MASK = torch.tensor([[True, True, True], [True, True, False]])
# learner (old) probabilities and sampler probabilities; [1, 2] is padding (garbage values)
OLD = torch.tensor([[0.5, 0.2, 0.3], [0.9, 0.1, 0.5]]).log()
SAMPLER = torch.tensor([[0.25, 0.4, 0.3], [0.45, 0.4, 1e-9]]).log()
# token ratios p_old / p_sampler: row 0 → 2, 0.5, 1; row 1 → 2, 0.25 (padding ignored)


def test_token_level_hand_values_and_cap():
    w = tis_weights(OLD, SAMPLER, MASK, level="token", cap=1.5)
    expected = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.25, 1.0]])  # 2 capped at 1.5; padding → 1
    torch.testing.assert_close(w, expected)


def test_sequence_level_hand_values_and_cap():
    # row 0: 2 · 0.5 · 1 = 1; row 1: 2 · 0.25 = 0.5 (the padded token does not count)
    w = tis_weights(OLD, SAMPLER, MASK, level="sequence", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 1.0]]))
    # a sequence ratio of 4 is capped
    old = torch.tensor([[0.8, 0.8]]).log()
    sampler = torch.tensor([[0.4, 0.4]]).log()
    w = tis_weights(old, sampler, torch.ones(1, 2, dtype=torch.bool), level="sequence", cap=3.0)
    torch.testing.assert_close(w, torch.full((1, 2), 3.0))


def test_none_and_bad_input():
    assert tis_weights(OLD, SAMPLER, MASK, level="none", cap=2.0) is None
    with pytest.raises(ValueError, match="token"):
        tis_weights(OLD, SAMPLER, MASK, level="tokens", cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(OLD, SAMPLER, MASK, level="token", cap=0.0)
    assert TIS_LEVELS == ("none", "token", "sequence")


def test_huge_log_ratio_stays_finite():
    old = torch.tensor([[0.0, 0.0]])
    sampler = torch.tensor([[-500.0, -500.0]])
    for level in ("token", "sequence"):
        w = tis_weights(old, sampler, torch.ones(1, 2, dtype=torch.bool), level=level, cap=2.0)
        assert torch.isfinite(w).all() and float(w.max()) == 2.0


def test_policy_loss_scales_each_token_by_the_tis_weight():
    """On policy (r = 1): ℓ_t = −A·c_t, token-mean over 5 tokens. Row A = 1, row A = −1.
    c (token, cap 1.5) = [1.5, 0.5, 1] and [1.5, 0.25]: loss = (−3 + 1.75) / 5 = −0.25."""
    lp = OLD.clone().requires_grad_(True)
    c = tis_weights(OLD, SAMPLER, MASK, level="token", cap=1.5)
    loss, parts = policy_loss(lp, None, torch.tensor([1.0, -1.0]), MASK, tis_weights=c)
    assert math.isclose(loss.item(), -0.25, abs_tol=1e-6)
    loss.backward()
    # d loss / d lp_t = −A·c_t·r / 5 at r = 1
    expected = torch.tensor([[-1.5, -0.5, -1.0], [1.5, 0.25, 0.0]]) / 5
    torch.testing.assert_close(lp.grad, expected)
    assert math.isclose(parts["train/tis_mean"], (1.5 + 0.5 + 1 + 1.5 + 0.25) / 5, abs_tol=1e-6)


def test_tis_multiplies_the_policy_term_only():
    """The KL term is not importance-weighted (the reference penalty is on the learner's samples)."""
    lp = OLD.clone()
    ref = OLD - 0.3
    c = torch.full_like(lp, 0.5)
    adv = torch.zeros(2)
    with_c, _ = policy_loss(lp, None, adv, MASK, ref_logprobs=ref, kl_coef=0.1, tis_weights=c)
    without, _ = policy_loss(lp, None, adv, MASK, ref_logprobs=ref, kl_coef=0.1)
    torch.testing.assert_close(with_c, without)
