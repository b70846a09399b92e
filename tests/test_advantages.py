"""Group-relative advantages (ALGORITHMS.md, 'GRPO'): hand-computed groups."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.algo.advantages import group_advantages, zero_advantage_groups


def test_hand_computed_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    # group 0: mean 0.5; deviations ±0.5; Bessel var = 4·0.25 / 3 = 1/3; std = 0.5773503
    s0 = math.sqrt(1.0 / 3.0) + 1e-6
    # group 1: mean 0.75; deviations −0.75 (×3), 2.25; var = (3·0.5625 + 5.0625) / 3 = 2.25; std = 1.5
    s1 = 1.5 + 1e-6
    expected = torch.tensor(
        [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [-0.75 / s1, -0.75 / s1, -0.75 / s1, 2.25 / s1]]
    )
    assert adv.shape == (2, 4)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    # ±0.5 / 0.57735 = ±0.8660254; −0.75 / 1.5 = −0.5; 2.25 / 1.5 = 1.5
    torch.testing.assert_close(adv[1], torch.tensor([-0.5, -0.5, -0.5, 1.5]), rtol=0, atol=1e-5)


def test_without_std_normalisation_is_centred_reward():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards, std_normalize=False)
    # Dr. GRPO: R − mean_g R; means 0.5 and 0.75
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)


@pytest.mark.parametrize("std_normalize", [True, False])
def test_equal_reward_group_gives_exactly_zero(std_normalize):
    # In float32 the mean of eight 0.1s is not 0.1 bit for bit (R − mean = −7.45e-9, std 8e-9): without
    # an explicit zero the group would get advantages of −0.0074 instead of 0.
    rewards = torch.tensor([[0.1] * 8, [0.7] * 8, [1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards, std_normalize=std_normalize)
    assert torch.equal(adv[:2], torch.zeros(2, 8))
    assert (adv[2] != 0).sum() == 2  # 1.0 and 0.0 move; 0.5 is the mean
    torch.testing.assert_close(zero_advantage_groups(rewards), torch.tensor([True, True, False]))


def test_zero_advantage_groups_shape_and_dtype():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    zero = zero_advantage_groups(rewards)
    assert zero.dtype == torch.bool
    assert zero.tolist() == [True, False, True, True]


def test_group_of_one_raises():
    with pytest.raises(ValueError, match=r"rollout.group_size must be ≥ 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


def test_rejects_non_2d_rewards():
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]))


def test_input_is_not_modified():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    before = rewards.clone()
    group_advantages(rewards)
    assert torch.equal(rewards, before)
