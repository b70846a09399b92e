"""The clipped policy loss, aggregation and bucket diagnostics (ALGORITHMS.md): hand values, clip
boundaries, gradient sign, padding invariance, GRPO ≡ TR-GRPO at w = 1, micro-batch additivity."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.algo.kl import ESTIMATORS, kl_penalty
from trgrpo.algo.losses import (
    AGG_MODES,
    LOG_RATIO_CLAMP,
    Normalizer,
    aggregate,
    bucket_metrics,
    bucket_sums,
    policy_loss,
)

NAN, INF = float("nan"), float("inf")
MASK = torch.tensor([[True, True, True], [True, True, False]])
# ratios r = exp(log p − log p_old) of the [2, 3] example; [1, 2] is padding
RATIOS = [[1.1, 0.7, 1.3], [0.7, 1.25, 1.0]]
ADV = torch.tensor([1.0, -0.5])
WEIGHTS = torch.tensor([[1.0, 1.2, 1.4], [1.4, 1.1, 9.0]])


def _example(pad: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [2, 3] requiring grad, old_logprobs [2, 3]) with the ratios RATIOS."""
    lp = torch.tensor([[0.5, 0.3, 0.6], [0.2, 0.9, 0.5]], dtype=torch.float64).log()
    old = lp - torch.tensor(RATIOS, dtype=torch.float64).log()
    lp, old = lp.float(), old.float()
    lp[1, 2], old[1, 2] = pad, -pad
    return lp.requires_grad_(True), old


# Per-token ℓ = −min(r·A, clip(r, 0.8, 1.2)·A):
#   row 0 (A = 1):    r 1.1 → −1.1;  r 0.7 → −min(0.7, 0.8) = −0.7;  r 1.3 → −min(1.3, 1.2) = −1.2 (clipped high)
#   row 1 (A = −0.5): r 0.7 → −min(−0.35, −0.4) = 0.4 (clipped low);  r 1.25 → −min(−0.625, −0.6) = 0.625
#   row sums: S0 = −3.0, S1 = 1.025, total −1.975 over 5 tokens, 2 rows, T = 3
# ∂ℓ/∂log p = −A·r where not clipped, 0 where clipped: [[−1.1, −0.7, 0], [0, 0.625, 0]]
HAND = {
    # loss, per-row gradient divisor, clip_frac_low, clip_frac_high, ratio_mean
    "token-mean": (-1.975 / 5, [5, 5], 1 / 5, 1 / 5, 5.05 / 5),
    # (S0/3 + S1/2) / 2 = (−1 + 0.5125) / 2; clip low (0 + 1/2)/2; high (1/3 + 0)/2; ratio (3.1/3 + 1.95/2)/2
    "seq-mean-token-mean": (-0.24375, [6, 4], 0.25, 1 / 6, (3.1 / 3 + 1.95 / 2) / 2),
    # Σ / (T·B) = Σ / 6
    "seq-mean-token-sum-norm": (-1.975 / 6, [6, 6], 1 / 6, 1 / 6, 5.05 / 6),
}
GRAD_NUMERATOR = torch.tensor([[-1.1, -0.7, 0.0], [0.0, 0.625, 0.0]])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_hand_computed_loss_gradient_and_metrics(agg):
    lp, old = _example()
    loss, m = policy_loss(lp, old, ADV, MASK, agg=agg)
    value, divisors, low, high, ratio_mean = HAND[agg]
    assert loss.item() == pytest.approx(value, abs=1e-6)
    loss.backward()
    expected_grad = GRAD_NUMERATOR / torch.tensor(divisors, dtype=torch.float32)[:, None]
    torch.testing.assert_close(lp.grad, expected_grad, rtol=0, atol=1e-6)
    assert lp.grad[0, 2] == 0 and lp.grad[1, 0] == 0 and lp.grad[1, 2] == 0  # exactly zero where clipped
    assert m["loss/policy"] == pytest.approx(value, abs=1e-6)
    assert m["loss/kl"] == 0.0
    assert m["train/clip_frac_low"] == pytest.approx(low, abs=1e-7)
    assert m["train/clip_frac_high"] == pytest.approx(high, abs=1e-7)
    assert m["train/ratio_mean"] == pytest.approx(ratio_mean, abs=1e-6)
    # k3(old ‖ current) per token = 1/r + ln r − 1
    k3 = [1 / r + math.log(r) - 1 for row in RATIOS for r in row][:5]
    if agg == "token-mean":
        assert m["train/approx_kl_old"] == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert all(isinstance(v, float) for v in m.values())


def test_hand_computed_token_weights_both_placements():
    # loss placement: w·ℓ = [−1.1, −0.84, −1.68], [0.56, 0.6875] → −2.3725 / 5
    lp, old = _example()
    loss, _ = policy_loss(lp, old, ADV, MASK, token_weights=WEIGHTS)
    assert loss.item() == pytest.approx(-2.3725 / 5, abs=1e-6)
    # ratio placement: w·r = [1.1, 0.84, 1.82], [0.98, 1.375]
    #   row 0: −1.1, −0.84, −min(1.82, 1.2) = −1.2 (clipped high);  row 1: 0.49, −min(−0.6875, −0.6) = 0.6875
    #   → −1.9625 / 5; clip fractions use w·r: high 1/5, low 0 (0.98 ≥ 0.8)
    loss, m = policy_loss(lp, old, ADV, MASK, token_weights=WEIGHTS, weight_placement="ratio")
    assert loss.item() == pytest.approx(-1.9625 / 5, abs=1e-6)
    assert m["train/clip_frac_high"] == pytest.approx(0.2, abs=1e-7)
    assert m["train/clip_frac_low"] == 0.0


@pytest.mark.parametrize(
    ("adv", "ratio", "clip_low", "clip_high", "clipped"),
    [
        (1.0, 1.25, 0.2, 0.2, True),  # A > 0 above 1 + ε_high
        (1.0, 1.25, 0.2, 0.28, False),  # clip-higher lets it through
        (1.0, 1.15, 0.2, 0.2, False),
        (1.0, 0.5, 0.2, 0.2, False),  # A > 0 below 1 − ε_low: min keeps r·A
        (-1.0, 0.75, 0.2, 0.2, True),  # A < 0 below 1 − ε_low
        (-1.0, 0.75, 0.3, 0.2, False),
        (-1.0, 0.85, 0.2, 0.2, False),
        (-1.0, 1.5, 0.2, 0.2, False),  # A < 0 above 1 + ε_high: min keeps r·A
    ],
)
def test_clip_boundaries(adv, ratio, clip_low, clip_high, clipped):
    lp = torch.tensor([[math.log(0.4)]], requires_grad=True)
    old = lp.detach() - math.log(ratio)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, m = policy_loss(lp, old, torch.tensor([adv]), mask, clip_low=clip_low, clip_high=clip_high)
    loss.backward()
    if clipped:
        assert torch.equal(lp.grad, torch.zeros(1, 1))
        key = "train/clip_frac_high" if adv > 0 else "train/clip_frac_low"
        assert m[key] == 1.0
    else:
        # ∂(−r·A)/∂log p = −r·A
        assert lp.grad.item() == pytest.approx(-adv * ratio, rel=1e-6)
        assert m["train/clip_frac_high"] == 0.0 and m["train/clip_frac_low"] == 0.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradient_sign(agg):
    # on policy (old None → r = 1): A > 0 ⇒ raising log p lowers the loss; A < 0 ⇒ raises it
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([0.7, -0.7])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = policy_loss(lp, None, adv, mask, agg=agg)
    loss.backward()
    assert (lp.grad[0] < 0).all() and (lp.grad[1] > 0).all()
    assert m["train/ratio_mean"] == 1.0  # every mode: 4 tokens, 2 rows, T = 2
    with torch.no_grad():
        bumped = lp.detach().clone()
        bumped[0, 0] += 1e-2
        moved, _ = policy_loss(bumped, lp.detach(), adv, mask, agg=agg)
    assert moved.item() < loss.item()


def _with_garbage_padding(x: torch.Tensor, values: list[float]) -> torch.Tensor:
    pad = torch.tensor(values, dtype=x.dtype).expand(x.shape[0], len(values))
    return torch.cat([x, pad], dim=1)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("placement", ["loss", "ratio"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_padding_invariance(agg, placement, estimator):
    # k1/k2 have no clamp: their backward would turn 0·nan into nan unless padding is selected away early
    def run(width: int):
        lp, old = _example(pad=NAN)
        lp = lp.detach()
        ref = torch.tensor([[-0.9, -1.1, -0.4], [-1.5, -0.2, NAN]])
        adv, w, mask = ADV[:, None].expand(2, 3), WEIGHTS.clone(), MASK
        if width > 3:
            lp = _with_garbage_padding(lp, [NAN, INF])
            old = _with_garbage_padding(old, [-INF, NAN])
            ref = _with_garbage_padding(ref, [NAN, -INF])
            adv = _with_garbage_padding(adv, [NAN, INF])
            w = _with_garbage_padding(w, [NAN, -INF])
            mask = _with_garbage_padding(mask, [False, False])
        lp.requires_grad_(True)
        norm = Normalizer.of(mask, max_len=3)
        loss, m = policy_loss(
            lp, old, adv, mask, agg=agg, token_weights=w, weight_placement=placement,
            weight_kl=True, ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator, norm=norm,
        )  # fmt: skip
        loss.backward()
        return loss, lp.grad, m

    loss3, grad3, m3 = run(3)
    loss5, grad5, m5 = run(5)
    assert torch.isfinite(loss5)
    # equal up to summation order (a reduction over 5 columns may group the terms differently)
    torch.testing.assert_close(loss5, loss3, rtol=0, atol=1e-7)
    torch.testing.assert_close(grad5[:, :3], grad3, rtol=0, atol=1e-8)
    assert torch.equal(grad5[:, 3:], torch.zeros(2, 2))
    assert grad3[1, 2] == 0
    assert m5 == pytest.approx(m3, rel=0, abs=1e-7)


@pytest.mark.parametrize("placement", ["loss", "ratio"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_grpo_equals_tr_grpo_when_weights_are_one(placement, agg):
    ref = torch.tensor([[-0.9, -1.1, -0.4], [-1.5, -0.2, -1.0]])
    out = []
    for w in (None, torch.ones(2, 3)):
        lp, old = _example()
        loss, m = policy_loss(
            lp, old, ADV, MASK, agg=agg, token_weights=w, weight_placement=placement,
            weight_kl=True, ref_logprobs=ref, kl_coef=0.05,
        )  # fmt: skip
        loss.backward()
        out.append((loss, lp.grad, m))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])
    assert out[0][2] == out[1][2]


def test_loss_placement_gradient_is_weight_times_grpo_gradient():
    g = torch.Generator().manual_seed(1)
    base = -torch.rand(4, 6, generator=g) * 3
    old = base + (torch.rand(4, 6, generator=g) - 0.5) * 0.8  # ratios in e^±0.4: some clipped
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    w = 1 + 0.4 * torch.rand(4, 6, generator=g)
    grads = []
    for weights in (None, w):
        lp = base.clone().requires_grad_(True)
        policy_loss(lp, old, adv, mask, token_weights=weights)[0].backward()
        grads.append(lp.grad)
    assert (grads[0] != 0).sum() > 5 and (grads[0] == 0).sum() > 5
    torch.testing.assert_close(grads[1], w * grads[0], rtol=0, atol=1e-7)


def test_ratio_placement_clips_large_weights_at_ratio_one():
    # w·r = 1.3 > 1.2 with A > 0: clipped at r = 1, no gradient; w = 1.1 passes: ∂/∂log p = −A·w·r = −1.1;
    # with A < 0 the min keeps w·r·A: ∂ = −(−1)·1.3 = 1.3
    lp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    w = torch.tensor([[1.3, 1.1], [1.3, 1.1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = policy_loss(
        lp, None, torch.tensor([1.0, -1.0]), mask, token_weights=w, weight_placement="ratio"
    )
    loss.backward()
    assert lp.grad[0, 0] == 0.0
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1.1], [1.3, 1.1]]) / 4, rtol=0, atol=1e-7)
    assert m["train/clip_frac_high"] == 0.25


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_additivity(agg):
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([4, 2, 3, 1])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    base = -torch.rand(4, 4, generator=g) * 3
    old = base + (torch.rand(4, 4, generator=g) - 0.5) * 0.8
    ref = base + (torch.rand(4, 4, generator=g) - 0.5)
    adv = torch.randn(4, generator=g)
    w = 1 + 0.4 * torch.rand(4, 4, generator=g)
    norm = Normalizer.of(mask, max_len=4)
    kw = dict(agg=agg, weight_kl=True, kl_coef=0.1, norm=norm)

    def run(rows: slice, width: int):
        lp = base[rows, :width].clone().requires_grad_(True)
        loss, m = policy_loss(
            lp, old[rows, :width], adv[rows], mask[rows, :width], token_weights=w[rows, :width],
            ref_logprobs=ref[rows, :width], **kw,
        )  # fmt: skip
        loss.backward()
        return loss, lp.grad, m

    whole, whole_grad, whole_m = run(slice(0, 4), 4)
    first, first_grad, first_m = run(slice(0, 2), 4)
    second, second_grad, second_m = run(slice(2, 4), 3)  # micro-batches may be trimmed to their own T
    assert (first + second).item() == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(first_grad, whole_grad[:2], rtol=0, atol=1e-7)
    torch.testing.assert_close(second_grad, whole_grad[2:, :3], rtol=0, atol=1e-7)
    assert set(first_m) == set(whole_m)
    for key, value in whole_m.items():
        assert first_m[key] + second_m[key] == pytest.approx(value, abs=1e-6), key
    assert whole_m["loss/kl"] > 0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_kl_term(agg):
    lp, old = _example()
    ref = torch.tensor([[-0.9, -1.1, -0.4], [-1.5, -0.2, -1.0]])
    base, _ = policy_loss(lp, old, ADV, MASK, agg=agg)
    kl = kl_penalty(lp.detach(), ref)
    with_kl, m = policy_loss(lp, old, ADV, MASK, agg=agg, ref_logprobs=ref, kl_coef=0.1)
    expected = 0.1 * aggregate(kl, MASK, agg)
    assert (with_kl - base).item() == pytest.approx(expected.item(), abs=1e-6)
    assert m["loss/kl"] == pytest.approx(aggregate(kl, MASK, agg).item(), abs=1e-6)
    # weight_kl multiplies the per-token KL by w (placement does not matter for the KL term)
    for placement in ("loss", "ratio"):
        pg, _ = policy_loss(lp, old, ADV, MASK, agg=agg, token_weights=WEIGHTS, weight_placement=placement)
        weighted, _ = policy_loss(
            lp, old, ADV, MASK, agg=agg, token_weights=WEIGHTS, weight_placement=placement,
            weight_kl=True, ref_logprobs=ref, kl_coef=0.1,
        )  # fmt: skip
        expected = 0.1 * aggregate(WEIGHTS * kl, MASK, agg)
        assert (weighted - pg).item() == pytest.approx(expected.item(), abs=1e-6)


def test_kl_hand_value():
    # A = 0 ⇒ pg = 0; p = 0.5 vs p_ref = 0.25: k3 = 0.5 + ln 2 − 1 = 0.1931472; β = 0.5 → 0.0965736;
    # weighted by w = 1.4 → 0.1352030
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, m = policy_loss(lp, None, torch.zeros(1), mask, ref_logprobs=ref, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.0965736, abs=1e-6)
    assert m["loss/kl"] == pytest.approx(0.1931472, abs=1e-6)
    w = torch.tensor([[1.4]])
    loss, _ = policy_loss(
        lp, None, torch.zeros(1), mask, token_weights=w, weight_kl=True, ref_logprobs=ref, kl_coef=0.5
    )
    assert loss.item() == pytest.approx(0.1352030, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, None, torch.zeros(1), mask, kl_coef=0.5)


def test_log_ratio_is_clamped():
    assert LOG_RATIO_CLAMP == 20.0
    lp = torch.tensor([[0.0, -100.0]], requires_grad=True)
    old = torch.tensor([[-100.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = policy_loss(lp, old, torch.tensor([-1.0]), mask)
    # r = e^20 and e^−20 (not e^±100); A = −1: ℓ = −min(−r, −clip(r)) = max(r, clip(r)) → (e^20 + 0.8) / 2
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx((math.exp(20) + 0.8) / 2, rel=1e-6)
    assert m["train/ratio_mean"] == pytest.approx((math.exp(20) + math.exp(-20)) / 2, rel=1e-6)


def test_advantages_per_token_equal_broadcast():
    lp, old = _example()
    a, _ = policy_loss(lp, old, ADV, MASK)
    b, _ = policy_loss(lp, old, ADV[:, None].expand(2, 3).contiguous(), MASK)
    assert torch.equal(a, b)


def test_inputs_are_not_modified():
    lp, old = _example(pad=NAN)
    ref = torch.full((2, 3), -1.0)
    ref[1, 2] = NAN
    adv = ADV[:, None].repeat(1, 3)
    adv[1, 2] = INF
    inputs = [lp.detach(), old, adv, ref, WEIGHTS, MASK]
    before = [x.clone() for x in inputs]
    policy_loss(lp, old, adv, MASK, token_weights=WEIGHTS, weight_kl=True, ref_logprobs=ref, kl_coef=0.1)
    for x, y in zip(inputs, before):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_unknown_names_list_valid_ones():
    lp, old = _example()
    with pytest.raises(ValueError) as err:
        policy_loss(lp, old, ADV, MASK, agg="mean")
    assert all(name in str(err.value) for name in AGG_MODES)
    with pytest.raises(ValueError) as err:
        policy_loss(lp, old, ADV, MASK, weight_placement="advantage")
    assert "loss" in str(err.value) and "ratio" in str(err.value)
    with pytest.raises(ValueError) as err:
        policy_loss(lp, old, ADV, MASK, kl_estimator="k9")
    assert all(name in str(err.value) for name in ("k1", "k2", "k3"))
    with pytest.raises(ValueError) as err:
        aggregate(lp, MASK, "sum")
    assert all(name in str(err.value) for name in AGG_MODES)


def test_normalizer_and_aggregate_hand_values():
    norm = Normalizer.of(MASK)
    assert (norm.tokens, norm.sequences, norm.max_len) == (5.0, 2.0, 3.0)
    assert Normalizer.of(MASK, max_len=8).max_len == 8.0
    assert Normalizer.of(torch.zeros(2, 3, dtype=torch.bool)).tokens == 1.0  # no division by zero
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    # token-mean 15/5 = 3; seq-mean-token-mean (6/3 + 9/2)/2 = 3.25; sum-norm 15/(3·2) = 2.5
    assert aggregate(values, MASK, "token-mean").item() == 3.0
    assert aggregate(values, MASK, "seq-mean-token-mean").item() == 3.25
    assert aggregate(values, MASK, "seq-mean-token-sum-norm").item() == 2.5
    # a shared normalizer: tokens 10, sequences 4, max_len 5 → 1.5, 1.625, 0.75
    shared = Normalizer(tokens=10.0, sequences=4.0, max_len=5.0)
    assert aggregate(values, MASK, "token-mean", shared).item() == 1.5
    assert aggregate(values, MASK, "seq-mean-token-mean", shared).item() == 1.625
    assert aggregate(values, MASK, "seq-mean-token-sum-norm", shared).item() == 0.75


# bucket example: p = [[0.05, 0.3, 0.95], [0.6, 0.12, pad]], A = [2, −1], w = WEIGHTS
#   [0, .1):  p .05          count 1, proxy .95·2·1 = 1.9,                    Σw 1.0
#   [.1, .5): p .3, .12      count 2, proxy .7·2·1.2 + .88·1·1.1 = 2.648,     Σw 2.3
#   [.5, .9): p .6           count 1, proxy .4·1·1.4 = .56,                   Σw 1.4
#   [.9, 1]:  p .95          count 1, proxy .05·2·1.4 = .14,                  Σw 1.4
BUCKET_LP = torch.tensor([[0.05, 0.3, 0.95], [0.6, 0.12, 1.0]], dtype=torch.float64).log().float()
BUCKET_SUMS = [[1, 1.9, 1.0], [2, 2.648, 2.3], [1, 0.56, 1.4], [1, 0.14, 1.4]]


def test_bucket_sums_hand_values():
    lp = BUCKET_LP.clone()
    lp[1, 2] = NAN
    sums = bucket_sums(lp, torch.tensor([2.0, -1.0]), WEIGHTS, MASK)
    assert sums.shape == (4, 3) and sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.tensor(BUCKET_SUMS, dtype=torch.float64), rtol=0, atol=1e-6)
    # without weights Σw is the count
    plain = bucket_sums(lp, torch.tensor([2.0, -1.0]), None, MASK)
    torch.testing.assert_close(plain[:, 2], plain[:, 0], rtol=0, atol=0)


def test_bucket_sums_edges_and_additivity():
    # p = 1 (last bucket, closed), 0 (first), 0.5 exactly (an inner edge: lower-closed, so the third)
    lp = torch.tensor([[0.0, -INF, math.log(0.5)]])
    assert lp[0, 2].exp().item() == 0.5
    sums = bucket_sums(lp, torch.tensor([1.0]), None, torch.ones(1, 3, dtype=torch.bool))
    assert sums[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    adv = torch.tensor([2.0, -1.0])
    whole = bucket_sums(BUCKET_LP, adv, WEIGHTS, MASK)
    parts = bucket_sums(BUCKET_LP[:1], adv[:1], WEIGHTS[:1], MASK[:1]) + bucket_sums(
        BUCKET_LP[1:, :2], adv[1:], WEIGHTS[1:, :2], MASK[1:, :2]
    )
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)


def test_bucket_metrics_hand_values():
    m = bucket_metrics(torch.tensor(BUCKET_SUMS, dtype=torch.float64))
    assert len(m) == 12
    assert m["buckets/p0-0.1/token_share"] == pytest.approx(0.2, abs=1e-12)
    assert m["buckets/p0.1-0.5/token_share"] == pytest.approx(0.4, abs=1e-12)
    assert m["buckets/p0-0.1/grad_share"] == pytest.approx(1.9 / 5.248, abs=1e-12)
    assert m["buckets/p0.1-0.5/grad_share"] == pytest.approx(2.648 / 5.248, abs=1e-12)
    assert m["buckets/p0.9-1/grad_share"] == pytest.approx(0.14 / 5.248, abs=1e-12)
    assert m["buckets/p0.1-0.5/weight_mean"] == pytest.approx(1.15, abs=1e-12)
    assert m["buckets/p0.5-0.9/weight_mean"] == pytest.approx(1.4, abs=1e-12)
    empty = bucket_metrics(torch.zeros(4, 3, dtype=torch.float64))
    assert all(v == 0.0 for v in empty.values())
