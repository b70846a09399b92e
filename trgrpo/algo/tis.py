"""Truncated importance sampling (TIS): correcting for the sampler and the learner disagreeing.

The engine samples from π_sampler (vLLM kernels, bf16, top-p renormalisation), the loss is computed
for π_old (the learner's own log-probs of the same tokens). Weighting each token's policy-gradient
term by the ratio π_old / π_sampler, capped at C, removes most of that bias at bounded variance:

- token level:    c_t = min(exp(log π_old(y_t) − log π_sampler(y_t)), C)
- sequence level: c_t = min(exp(Σ_s [log π_old(y_s) − log π_sampler(y_s)]), C) for every t of the row

Only the policy term is weighted (the KL penalty is not). Pure tensor code; the learner calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor

TIS_LEVELS = ("none", "token", "sequence")
_LOG_CLAMP = 20.0  # exp(20) ≈ 5e8: far above any cap, and no overflow


def tis_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, response_mask: Tensor, *, level: str, cap: float
) -> Tensor | None:
    """[B, T] capped importance weights (1 at padding), detached; None for level "none"."""
    if level not in TIS_LEVELS:
        raise ValueError(f"unknown TIS level {level!r}; valid: {', '.join(TIS_LEVELS)}")
    if not cap > 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    if level == "none":
        return None
    mask = response_mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(mask, old_logprobs.float() - sampler_logprobs.float(), 0.0)
        if level == "sequence":
            log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
        ratio = log_ratio.clamp(-_LOG_CLAMP, _LOG_CLAMP).exp().clamp(max=cap)
        return torch.where(mask, ratio, 1.0)
