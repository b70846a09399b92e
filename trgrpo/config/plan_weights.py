"""The token-weight part of `trgrpo plan`: the configured weight curve, what normalisation does, and
the warnings a curve deserves (constant weights, weights beyond the clip range)."""

from __future__ import annotations

from trgrpo.algo.token_weights import SHAPES, weight_curve
from trgrpo.config.schema import Config

Row = tuple[str, str]
PROBES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 0.99)  # probabilities at which the weight curve is shown
_GRID = tuple(i / 1000 for i in range(1001))  # p ∈ [0, 1] for the curve's range (constancy, caveats)
_CONSTANT = 1e-6  # float32 tolerance: max − min below it is a constant weight; w = 1 + ε is not above it


def curve(cfg: Config, probs=PROBES) -> list[float] | None:
    """The configured token weight at each p in `probs`; None when the weight parameters are invalid."""
    w = cfg.algo.weights
    if w.shape not in SHAPES or w.tau <= 0:
        return None
    try:
        return weight_curve(
            probs, shape=w.shape, alpha=w.alpha, tau=w.tau, mu=w.mu, lower=w.lower, upper=w.upper
        )
    except ValueError:
        return None


def weight_rows(cfg: Config) -> tuple[list[Row], list[str]]:
    w, a = cfg.algo.weights, cfg.algo
    tau = f"1/{1 / w.tau:.4g}" if 0 < w.tau < 1 and abs(1 / w.tau - round(1 / w.tau)) < 1e-6 else f"{w.tau:g}"
    formula = {
        "none": "w ≡ 1 (GRPO)",
        "sigmoid": f"w = clip({w.alpha:g}·(σ(p/τ) − {w.mu:g}), {w.lower:g}, {w.upper:g}), τ = {tau}",
        "reverse": f"w = clip({w.alpha:g}·(σ((1 − p)/τ) − {w.mu:g}), {w.lower:g}, {w.upper:g}), τ = {tau}",
        "linear": f"w = {w.alpha:g}·p + {1 - w.alpha:g} (algo.weights.lower/upper unused)",
    }.get(w.shape, f"unknown shape {w.shape!r}")
    placement = {
        "loss": "loss: ℓ ← w·ℓ (a per-token gradient weight)",
        "ratio": "ratio: w multiplies r inside the clip",
    }.get(w.placement, f"unknown {w.placement!r}")
    kl_note = "" if a.kl_coef > 0 or not w.weight_kl else " (no effect: algo.kl_coef=0)"
    rows = [
        ("shape", f"{w.shape}: {formula}"),
        ("p", "the token's probability before the update (old log-probs), detached: no gradient through w"),
        ("placement", placement),
        ("weight_kl", f"{str(w.weight_kl).lower()}{kl_note}"),
        ("normalize", _normalize_text(cfg)),
    ]
    values, grid = curve(cfg), curve(cfg, _GRID)
    if values is None or grid is None:
        return [*rows, ("curve", "unavailable: invalid weight parameters (see problems)")], []
    rows.append(("curve", "  ".join(f"w({p:g})={v:.3f}" for p, v in zip(PROBES, values))))
    w_min, w_max = min(grid), max(grid)
    rows.append(("range", f"w ∈ [{w_min:.3f}, {w_max:.3f}] over p ∈ [0, 1]"))
    return rows, _weight_warnings(cfg, grid)


def _normalize_text(cfg: Config) -> str:
    """What algo.weights.normalize does, and what computing the step's mean weight costs."""
    w, a, t = cfg.algo.weights, cfg.algo, cfg.trainer
    if w.normalize == "none":
        return "none: w as the formula gives it (the paper); its mean (weights/mean) scales the step"
    if w.normalize != "mean":
        return f"unknown {w.normalize!r}"
    if w.shape == "none":
        return "mean (no effect: algo.weights.shape=none, every w is 1)"
    if t.ppo_epochs > 1 or t.minibatches > 1:
        how = "the mean comes from the old log-probs scored before the updates (no extra cost)"
    elif w.placement == "loss" and (a.kl_coef <= 0 or w.weight_kl):
        how = (
            "the loss is linear in w, so the step's gradient is divided by the mean after the backward "
            "passes (no extra cost)"
        )
    else:
        how = "the mean needs p before the backward passes: one extra no-grad forward per optimizer step"
    return (
        "mean: w ← w / mean w over the optimizer step's response tokens (all micro-batches and ranks): "
        f"mean weight 1, only the redistribution between tokens remains (weights/raw_mean logs the mean "
        f"before); {how}"
    )


def _weight_warnings(cfg: Config, grid: list[float]) -> list[str]:
    w, a = cfg.algo.weights, cfg.algo
    out = []
    if w.shape != "none" and max(grid) - min(grid) < _CONSTANT:
        out.append(
            f"weights are constant (w = {grid[0]:.4g} for every p): this is GRPO with a scale; "
            "check algo.weights.tau (τ = 9 read literally gives w ≡ 1, the tr_grpo preset uses τ = 1/9)"
        )
    if w.placement != "ratio" or w.shape == "none":
        return out
    above = [p for p, v in zip(_GRID, grid) if v > 1 + a.clip_high + _CONSTANT]
    below = [p for p, v in zip(_GRID, grid) if v < 1 - a.clip_low - _CONSTANT]
    if above:
        out.append(
            f"algo.weights.placement=ratio with w up to {max(grid):.3g} > 1+ε_high = {1 + a.clip_high:g}: "
            f"tokens with w > 1+ε_high and A > 0 get no gradient at r = 1 (p ∈ [{min(above):g}, "
            f"{max(above):g}]); use placement=loss, lower algo.weights.upper or raise algo.clip_high"
        )
    if below:
        out.append(
            f"algo.weights.placement=ratio with w down to {min(grid):.3g} < 1−ε_low = {1 - a.clip_low:g}: "
            f"tokens with w < 1−ε_low and A < 0 get no gradient at r = 1 (p ∈ [{min(below):g}, "
            f"{max(below):g}]); use placement=loss or raise algo.clip_low"
        )
    return out
