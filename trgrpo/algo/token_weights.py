"""Per-token weights w = f(p) of a token's own probability (ALGORITHMS.md, 'TR-GRPO').

The weights are constants for the optimiser (no gradient flows through them); the loss decides where
they enter (losses.policy_loss, `weight_placement`). This module also gives the optional mean
normalisation (`normalize: mean`, w / mean w, so that only the redistribution between tokens remains),
the weight curve for reports and the per-step weight diagnostics. It does not pick presets (the
config's job), nor take the mean over a whole optimizer step (the learner sums over micro-batches and
ranks and passes the totals in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SHAPES = ("none", "sigmoid", "linear", "reverse")
NORMALIZE = ("none", "mean")
_BOUND_TOLERANCE = 1e-5  # float32 weights at a clip bound may differ from it by an ulp or so


def _weight_of_p(
    p: Tensor, *, shape: str, alpha: float, tau: float, mu: float, lower: float, upper: float
) -> Tensor:
    """p [*] float32 probabilities → weights [*] float32."""
    if shape not in SHAPES:
        raise ValueError(f"unknown token weight shape {shape!r}; valid: {', '.join(SHAPES)}")
    if shape == "none":
        return torch.ones_like(p)
    if shape == "linear":
        return alpha * p + (1.0 - alpha)
    if lower > upper:
        raise ValueError(f"token weight bounds need lower ≤ upper, got lower={lower}, upper={upper}")
    x = p if shape == "sigmoid" else 1.0 - p
    return (alpha * (torch.sigmoid(x / tau) - mu)).clamp(lower, upper)


def token_weights(
    logprobs: Tensor,
    *,
    shape: str,
    alpha: float = 2.0,
    tau: float = 1 / 9,
    mu: float = 0.25,
    lower: float = 1.0,
    upper: float = 1.4,
) -> Tensor:
    """logprobs [B, T] → weights [B, T] float32, no grad (logprobs are detached; p = exp(logprobs)).

    - `none`: ones (GRPO).
    - `sigmoid`: TR-GRPO's probability shaping, "Token-Regulated GRPO" (arXiv 2511.00066):
      w = clip(alpha·(σ(p/tau) − mu), lower, upper). The circulating values (alpha 2, tau 9, mu 0.25,
      L 1, U 1.4) give w ≡ 1 on [0, 1] when read literally; the default tau = 1/9 is the non-degenerate
      reading (1.0 for p ≤ 0.12, 1.22 at 0.2, 1.37 at 0.3, 1.4 for p ≥ 0.33).
    - `linear`: Advantage Reweighting (arXiv 2505.12929): alpha·p + 1 − alpha; lower/upper unused.
      That paper uses the sampling-time probability: pass old_logprobs for it.
    - `reverse`: the paper's ablation, decreasing in p: clip(alpha·(σ((1 − p)/tau) − mu), lower, upper).

    Padding positions get a weight too (whatever their logprob gives); the loss masks them.
    """
    with torch.no_grad():
        p = logprobs.detach().float().exp()
        return _weight_of_p(p, shape=shape, alpha=alpha, tau=tau, mu=mu, lower=lower, upper=upper)


def mean_scale(weight_sum: float, tokens: float) -> float:
    """The factor `normalize: mean` multiplies every weight by: tokens / weight_sum = 1 / mean weight.

    1.0 (no normalisation) when there is no token or the weights sum to ≤ 0 (every weight 0: the loss
    is 0 whatever the factor)."""
    if tokens <= 0 or weight_sum <= 0:
        return 1.0
    return float(tokens) / float(weight_sum)


def normalize_weights(
    weights: Tensor, mask: Tensor, *, weight_sum: float | None = None, tokens: float | None = None
) -> Tensor:
    """weights [B, T], mask [B, T] bool → weights / (weight_sum / tokens) [B, T] float32, no grad.

    weight_sum and tokens are the sum of the weights over the mask-True tokens and their count; the
    learner passes an optimizer step's totals (all micro-batches, all ranks). Both None → this batch's.
    """
    with torch.no_grad():
        w = weights.detach().float()
        if weight_sum is None or tokens is None:
            picked = w[mask.bool()].double()
            weight_sum, tokens = float(picked.sum()), float(picked.numel())
        return w * mean_scale(weight_sum, tokens)


def weight_curve(probs: Sequence[float], *, shape: str, **params: float) -> list[float]:
    """The weight at each probability in `probs` (for `trgrpo plan` and the README's table).

    `params` are token_weights' keyword arguments (alpha, tau, mu, lower, upper).
    """
    defaults = {"alpha": 2.0, "tau": 1 / 9, "mu": 0.25, "lower": 1.0, "upper": 1.4}
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown weight parameters {sorted(unknown)}; valid: {', '.join(defaults)}")
    p = torch.tensor([float(x) for x in probs], dtype=torch.float32)
    return _weight_of_p(p, shape=shape, **{**defaults, **params}).tolist()


def weight_stats(
    weights: Tensor, mask: Tensor, *, lower: float, upper: float, scale: float = 1.0
) -> dict[str, float]:
    """weights [B, T] (before normalisation), mask [B, T] bool → the weight distribution over mask-True
    tokens; `scale` is the normalisation factor (mean_scale) the loss applied to them.

    Keys: weights/mean, weights/std (population, so one token gives 0), weights/min, weights/max (of
    the applied weights scale·w: mean 1 under `normalize: mean`), weights/raw_mean (of w: the scale the
    formula gives), weights/frac_lower and weights/frac_upper (share of w within 1e-5 of the clip
    bounds), weights/constant (1.0 when max − min < 1e-6: the run is then GRPO with a scale, worth a
    warning). With no token every value is 0.0.
    """
    keys = ("mean", "std", "min", "max", "frac_lower", "frac_upper", "constant", "raw_mean")
    with torch.no_grad():
        w = weights.detach().float()[mask.bool()]
        if w.numel() == 0:
            return {f"weights/{k}": 0.0 for k in keys}
        lo, hi = w.min(), w.max()
        mean = w.double().mean().float()  # float64: the mean of 1.4s is 1.4 to the last float32 bit
        stats = torch.stack(
            [
                mean * scale,
                w.std(unbiased=False) * scale,
                lo * scale,
                hi * scale,
                ((w - lower).abs() <= _BOUND_TOLERANCE).float().mean(),
                ((w - upper).abs() <= _BOUND_TOLERANCE).float().mean(),
                (hi - lo < 1e-6).float(),
                mean,
            ]
        ).tolist()  # one device sync
    return {f"weights/{k}": float(v) for k, v in zip(keys, stats)}
