"""The learner's CPU attention under bf16 autocast (learner/attention.py): blocks of rows in bfloat16
with a float32 softmax, the backward recomputing the probabilities. Checked against a hand-computed
case and a float64 reference, for values and gradients, with GQA, masks and several blocks."""

from __future__ import annotations

import math

import pytest
import torch

from trgrpo.learner import attention
from trgrpo.learner.attention import block_attention


def _reference(q, k, v, mask, scale):
    """float64 attention: softmax(q k^T · scale, masked) v, each query head under its kv head."""
    q, k, v = q.double(), k.double(), v.double()
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a query that sees no key: zero output
    return p @ v


def test_hand_computed_single_query():
    """q = [1, 0] against keys [1, 0] and [0, 1] (scale 1): scores 1 and 0, probabilities
    e/(1+e) = 0.7311 and 0.2689, so the output is 0.7311·[1, 2] + 0.2689·[3, 4] = [1.5379, 2.5379]."""
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = block_attention(q, k, v, None, 1.0)
    p = math.e / (1 + math.e)
    expected = torch.tensor([p * 1 + (1 - p) * 3, p * 2 + (1 - p) * 4])
    assert out.shape == (1, 1, 1, 2)
    assert torch.allclose(out.float().flatten(), expected, atol=0.02)  # bf16: 8 mantissa bits


def _inputs(seed=0, b=5, heads=4, kv=2, t=6, s=9, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, t, d, generator=g, requires_grad=True)
    k = torch.randn(b, kv, s, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv, s, d, generator=g).bfloat16().requires_grad_()
    # left padding (row i hides its first i keys) and causal over the last t keys, as the learner's
    # continuation of a shared prompt sees them
    mask = torch.ones(b, 1, t, s, dtype=torch.bool)
    mask[..., s - t :] = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(b):
        mask[i, ..., :i] = False
    return q, k, v, mask


@pytest.mark.parametrize("block_rows", [1, 2, 64])
def test_matches_float64_reference_values_and_gradients(monkeypatch, block_rows):
    """Blocks of 1, 2 (5 rows: a short last block) and all rows. Tolerances are bf16's: outputs within
    0.03 of the float64 reference (measured 0.013), gradients at cosine ≥ 0.999 to it (measured
    0.99998 for q and k)."""
    q, k, v, mask = _inputs()
    d = q.shape[-1]
    monkeypatch.setattr(attention, "block_rows", lambda per_row: block_rows)
    out = block_attention(q, k, v, mask, d**-0.5)
    ref = _reference(q, k, v, mask, d**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert (out.double() - ref).abs().max() < 0.03
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (q, k, v))
    for got, want, tensor in zip(grads, ref_grads, (q, k, v)):
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        cos = torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0)
        assert cos > 0.999, float(cos)


def test_blocks_do_not_change_the_result(monkeypatch):
    """Rows are independent: one row per block gives what one block of every row gives."""
    q, k, v, mask = _inputs(seed=2, b=4)
    monkeypatch.setattr(attention, "block_rows", lambda per_row: 64)
    whole = block_attention(q, k, v, mask, 0.3)
    monkeypatch.setattr(attention, "block_rows", lambda per_row: 1)
    rows = block_attention(q, k, v, mask, 0.3)
    assert torch.allclose(whole.float(), rows.float(), atol=1e-2)


def test_a_query_that_sees_no_key_gives_zeros_and_finite_gradients():
    q, k, v, mask = _inputs(seed=3, b=2)
    mask[0, :, 2] = False  # row 0's third query: nothing visible
    out = block_attention(q, k, v, mask, 0.5)
    assert torch.equal(out[0, :, 2].float(), torch.zeros_like(out[0, :, 2].float()))
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, :, 2], torch.zeros_like(grads[0][0, :, 2]))


def test_block_rows_keeps_a_block_of_scores_under_the_budget():
    per_row = 8 * 63 * 93  # heads × queries × keys of one row
    rows = attention.block_rows(per_row)
    assert rows >= 1 and rows * per_row <= attention.BLOCK_SCORES
    assert attention.block_rows(attention.BLOCK_SCORES * 3) == 1  # a row larger than the budget: one


def test_the_kept_probabilities_are_capped_over_the_models_layers(monkeypatch):
    """Under CPU bf16 autocast a call runs block attention (bf16 output) while its probabilities times
    the layer count fit MAX_KEPT, and float32 SDPA (float32 output) beyond; the values agree."""
    from types import SimpleNamespace

    q, k, v, mask = _inputs(seed=4, heads=2, kv=2)
    entries = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    monkeypatch.setattr(attention, "MAX_KEPT", entries * 4)

    def call(layers):
        module = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers), is_causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention._forward(module, q, k, v, mask, scaling=0.3)
        return out

    block, sdpa = call(4), call(5)
    assert block.dtype == torch.bfloat16 and sdpa.dtype == torch.float32
    assert torch.allclose(block.float(), sdpa, atol=0.03)
