"""Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ (ALGORITHMS.md, 'GRPO').

Schulman's k1/k2/k3 ("Approximating KL divergence", 2020); k3 is verl's low_var_kl. This module only
estimates per token: the loss weights and aggregates (losses.policy_loss).
"""

from __future__ import annotations

from torch import Tensor

KL_LOG_RATIO_CLAMP = 10.0  # k3 grows like e^x: bound its log-ratio so one token cannot blow up the loss
ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3") -> Tensor:
    """logprobs, ref_logprobs [B, T] → [B, T] float32 per-token estimate of KL(π_θ ‖ π_ref).

    d = log p − log p_ref. k1 = d (unbiased, can be negative); k2 = ½ d²; k3 = exp(−d) + d − 1
    (unbiased, ≥ 0, low variance) with −d clamped to ±KL_LOG_RATIO_CLAMP, beyond which it is flat.
    Gradients flow through logprobs, never through ref_logprobs (the reference is frozen).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    d = logprobs.float() - ref_logprobs.detach().float()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    x = (-d).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return x.exp() - x - 1.0
