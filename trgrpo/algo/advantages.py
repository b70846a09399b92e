"""Group-relative advantages for GRPO (ALGORITHMS.md, 'GRPO').

Each prompt has G sampled responses; a response's advantage is its reward relative to its group. The
same advantage applies to every token of the response (the loss broadcasts it). This module does not
filter groups (dynamic sampling) or whiten across groups: it only scores within a group.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, *, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """rewards [N, G] → advantages [N, G], float32.

    With std_normalize: (R − mean_g R) / (std_g R + eps), std Bessel-corrected (as `torch.std`, verl and
    TRL). Without: R − mean_g R (Dr. GRPO). A group of equal rewards gives exactly 0 (not a rounding
    residue of the mean), so it contributes nothing to the loss.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"group advantages need at least two samples per prompt (got G = {rewards.shape[1]}): "
            "rollout.group_size must be ≥ 2"
        )
    rewards = rewards.detach().float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return torch.where(zero_advantage_groups(rewards)[:, None], torch.zeros_like(centred), centred)


def zero_advantage_groups(rewards: Tensor) -> Tensor:
    """rewards [N, G] → [N] bool, True where every reward of the group is equal (no learning signal)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    return (rewards == rewards[:, :1]).all(dim=1)
