"""The clipped policy-gradient loss of GRPO / TR-GRPO, its aggregation modes, and per-bucket diagnostics.

Pure functions of [B, T] tensors and a bool `response_mask` (True = the token counts). Everything a
step logs is normalised by one `Normalizer` for the whole optimizer step, so the losses and metrics of
its micro-batches add up to the step's values. This module does not compute log-probs, advantages or
token weights (see advantages.py, token_weights.py) and does not step an optimiser.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trgrpo.algo.kl import ESTIMATORS, kl_penalty

LOG_RATIO_CLAMP = 20.0  # e^20 ≈ 5e8: far outside any clip range, yet finite in float32
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
PLACEMENTS = ("loss", "ratio")
BUCKET_EDGES = (0.0, 0.1, 0.5, 0.9, 1.0)


@dataclass(frozen=True)
class Normalizer:
    """Global over one optimizer step (all micro-batches, all ranks): so that summing the losses of
    micro-batches gives exactly the loss of the whole batch."""

    tokens: float  # response-mask-True tokens in the step
    sequences: float  # response rows in the step
    max_len: float  # the Dr. GRPO constant (seq-mean-token-sum-norm), in tokens

    @classmethod
    def of(cls, response_mask: Tensor, max_len: float | None = None) -> Normalizer:
        """From one batch [B, T]; max_len None → T. At least one token, so an empty batch gives 0, not nan."""
        tokens = max(float(response_mask.bool().sum().item()), 1.0)
        sequences = max(float(response_mask.shape[0]), 1.0)
        return cls(tokens, sequences, float(response_mask.shape[1] if max_len is None else max_len))


def aggregate(values: Tensor, response_mask: Tensor, agg: str, norm: Normalizer | None = None) -> Tensor:
    """values [B, T], response_mask [B, T] → scalar float32.

    token-mean: Σ_{b,t} v·m / norm.tokens.
    seq-mean-token-mean (original GRPO): Σ_b [Σ_t v·m / max(Σ_t m, 1)] / norm.sequences.
    seq-mean-token-sum-norm (Dr. GRPO): Σ_{b,t} v·m / (norm.max_len · norm.sequences).
    Masked positions are selected away (torch.where), so nan/inf there do not matter.
    norm None → Normalizer.of(response_mask).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGG_MODES)}")
    mask = response_mask.bool()
    norm = Normalizer.of(mask) if norm is None else norm
    v = torch.where(mask, values.float(), 0.0)
    if agg == "token-mean":
        return v.sum() / norm.tokens
    if agg == "seq-mean-token-mean":
        per_seq = v.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_seq.sum() / norm.sequences
    return v.sum() / (norm.max_len * norm.sequences)


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """ℓ = −min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A), all [B, T]."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _masked(x: Tensor | None, mask: Tensor, fill: float, *, detach: bool) -> Tensor | None:
    """x [B, T] as float32 with masked positions replaced by `fill`, so nan/inf there cannot reach a
    gradient (torch.where sends exactly 0 to the unselected branch; a multiplication would send nan)."""
    if x is None:
        return None
    x = x.detach() if detach else x
    return torch.where(mask, x.float(), fill)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    token_weights: Tensor | None = None,
    weight_placement: str = "loss",
    weight_kl: bool = False,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    norm: Normalizer | None = None,
    tis_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO / TR-GRPO loss. All [B, T] except advantages [B] (broadcast over tokens) or [B, T].

    r = exp(clamp(log p − log p_old, ±LOG_RATIO_CLAMP)); old_logprobs None → logprobs.detach() (r = 1).
    Per token: ℓ = −min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A). token_weights w (detached):
    placement "loss": ℓ ← w·ℓ; placement "ratio": ℓ = −min(w·r·A, clip(w·r, …)·A). KL when
    kl_coef > 0 (needs ref_logprobs): kl_penalty per token, times w when weight_kl. tis_weights c
    (detached, algo/tis.py): the policy term only, ℓ ← c·ℓ.
    loss = aggregate(ℓ + kl_coef·kl, response_mask, agg, norm). Padding may hold nan/inf.
    Metrics (floats, aggregated with the same norm so micro-batch dicts sum to the step's): loss/policy,
    loss/kl (the aggregated KL term before kl_coef, including w when weight_kl; 0.0 when off),
    train/clip_frac_low, train/clip_frac_high (on the clipped quantity: w·r for placement "ratio"),
    train/ratio_mean, train/approx_kl_old (k3 between old and current policy), and train/tis_mean
    when tis_weights is given.
    """
    if weight_placement not in PLACEMENTS:
        raise ValueError(f"unknown weight_placement {weight_placement!r}; valid: {', '.join(PLACEMENTS)}")
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGG_MODES)}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (set the KL coefficient to 0 or compute them)")
    mask = response_mask.bool()
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and response_mask {tuple(mask.shape)} differ")
    norm = Normalizer.of(mask) if norm is None else norm
    lp = _masked(logprobs, mask, 0.0, detach=False)
    old = _masked(logprobs if old_logprobs is None else old_logprobs, mask, 0.0, detach=True)
    adv = advantages.detach()
    adv = _masked(adv[:, None].expand_as(mask) if adv.dim() == 1 else adv, mask, 0.0, detach=True)
    w = _masked(token_weights, mask, 1.0, detach=True)

    ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    effective = ratio * w if (w is not None and weight_placement == "ratio") else ratio
    pg = _clipped_surrogate(effective, adv, clip_low, clip_high)
    if w is not None and weight_placement == "loss":
        pg = w * pg
    c = _masked(tis_weights, mask, 1.0, detach=True)
    if c is not None:
        pg = c * pg
    kl = None
    if kl_coef > 0:
        kl = kl_penalty(lp, _masked(ref_logprobs, mask, 0.0, detach=True), estimator=kl_estimator)
        kl = w * kl if (weight_kl and w is not None) else kl
    loss = aggregate(pg if kl is None else pg + kl_coef * kl, mask, agg, norm)
    metrics = _loss_metrics(pg, kl, ratio, effective, adv, lp, old, mask, agg, norm, clip_low, clip_high)
    if c is not None:
        metrics["train/tis_mean"] = float(aggregate(c, mask, agg, norm))
    return loss, metrics


def _loss_metrics(
    pg: Tensor,
    kl: Tensor | None,
    ratio: Tensor,
    effective: Tensor,
    adv: Tensor,
    lp: Tensor,
    old: Tensor,
    mask: Tensor,
    agg: str,
    norm: Normalizer,
    clip_low: float,
    clip_high: float,
) -> dict[str, float]:
    """The diagnostics of policy_loss, each aggregated like the loss (all inputs [B, T])."""
    with torch.no_grad():
        per_token = {
            "loss/policy": pg,
            "loss/kl": torch.zeros_like(pg) if kl is None else kl,
            "train/clip_frac_low": ((adv < 0) & (effective < 1.0 - clip_low)).float(),
            "train/clip_frac_high": ((adv > 0) & (effective > 1.0 + clip_high)).float(),
            "train/ratio_mean": ratio,
            "train/approx_kl_old": kl_penalty(lp.detach(), old, estimator="k3"),
        }
        # one device sync for all of them
        values = torch.stack([aggregate(v.detach(), mask, agg, norm) for v in per_token.values()]).tolist()
    return dict(zip(per_token, values))


def bucket_sums(
    logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor | None,
    response_mask: Tensor,
    edges: Sequence[float] = BUCKET_EDGES,
) -> Tensor:
    """logprobs [B, T], advantages [B] or [B, T], weights [B, T] or None (ones), response_mask [B, T]
    → [K, 3] float64 with K = len(edges) − 1: per probability bucket [edges[k], edges[k+1]) (the last
    bucket closed) the token count, the gradient proxy Σ (1 − p)·|A|·w (ALGORITHMS.md, 'What to
    measure') and Σ w. Sums, so micro-batches add up; tokens outside [edges[0], edges[-1]] are dropped.
    """
    edge_t = _check_edges(edges)
    k = len(edges) - 1
    with torch.no_grad():
        mask = response_mask.bool()
        adv = advantages.detach()
        adv = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
        # p in float32 like everywhere else; the sums accumulate in float64 across a whole step
        p = logprobs.detach().float().exp()[mask].double()
        a = adv.double()[mask]
        w = torch.ones_like(p) if weights is None else weights.detach().double()[mask]
        inside = (p >= edges[0]) & (p <= edges[-1])
        p, a, w = p[inside], a[inside], w[inside]
        idx = torch.bucketize(p, edge_t[1:-1].to(p.device), right=True)
        columns = torch.stack([torch.ones_like(p), (1.0 - p) * a.abs() * w, w], dim=1)
        return torch.zeros(k, 3, dtype=torch.float64, device=p.device).index_add_(0, idx, columns)


def bucket_metrics(sums: Tensor, edges: Sequence[float] = BUCKET_EDGES) -> dict[str, float]:
    """sums [K, 3] from bucket_sums (summed over the step) → buckets/p{lo}-{hi}/token_share, grad_share,
    weight_mean (lo, hi formatted with :g). Empty totals or buckets give 0.0."""
    _check_edges(edges)
    if sums.shape != (len(edges) - 1, 3):
        raise ValueError(
            f"sums must be [{len(edges) - 1}, 3] for edges {tuple(edges)}, got {tuple(sums.shape)}"
        )
    s = sums.detach().double().cpu()
    totals = s.sum(dim=0)
    out: dict[str, float] = {}
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        count, grad, wsum = s[i].tolist()
        key = f"buckets/p{lo:g}-{hi:g}"
        out[f"{key}/token_share"] = count / totals[0].item() if totals[0] > 0 else 0.0
        out[f"{key}/grad_share"] = grad / totals[1].item() if totals[1] > 0 else 0.0
        out[f"{key}/weight_mean"] = wsum / count if count > 0 else 0.0
    return out


def _check_edges(edges: Sequence[float]) -> Tensor:
    edge_t = torch.tensor([float(e) for e in edges], dtype=torch.float64)
    if edge_t.numel() < 2 or not bool((edge_t.diff() > 0).all()):
        raise ValueError(f"bucket edges must be at least two increasing values, got {tuple(edges)}")
    return edge_t
