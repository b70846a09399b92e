"""The learner's attention on CPU under bf16 autocast: bf16 matmuls and a float32 softmax, in blocks of rows.

Under `trainer.precision=bf16` on a CPU, torch's SDPA kernels are slow for the learner's shapes: the
bf16 flash kernel's backward is ~2x slower than the float32 one's, and the float32 kernel (what the
learner used before) computes at a few GFLOP/s on short sequences with small heads. Here attention
is plain matmuls in bfloat16 (float32 accumulation inside each matmul) and a float32 softmax, over
blocks of rows whose float32 scores stay under `BLOCK_SCORES` entries (16 MB: glibc serves buffers
over 32 MB by a fresh mmap each time, whose page faults made one unblocked pass slower than SDPA).
The bf16 probabilities are kept for the backward (2 bytes per attention entry), whose softmax step
is one fused kernel; a call whose probabilities, times the model's layer count, would exceed
`MAX_KEPT` (2 GB over a forward) uses SDPA in float32 instead.

Measured, forward + backward against float32 SDPA (docs/BENCHMARKS.md): 0.44x (one thread) and 0.37x
(two) on the ~10M bench model's shapes, 0.31x and 0.26x on SmolLM2-135M's.

The numerics are the sampler's (rollout/prefix_decode.py): q · scale rounded to bf16, bf16 scores,
float32 softmax, probabilities rounded to bf16 before the product with v; so under bf16 the learner's
log-probs see the attention the shared-prefix decoder sampled with (tests/test_perf_paths.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_SCORES = 1 << 22  # float32 scores per block: 16 MB, half of glibc's largest heap-served buffer
# bf16 probabilities kept for backward over all layers of one forward: 2 GB (SmolLM2-135M's 8 × 8 × 128
# keeps ~1 GB); a call above its share (this ÷ the layer count) uses SDPA in float32
MAX_KEPT = 1 << 30
COMPUTE = torch.bfloat16


def block_rows(per_row: int) -> int:
    """Rows per block so that a block's scores (rows × per_row) stay within BLOCK_SCORES; at least 1."""
    return max(1, BLOCK_SCORES // max(per_row, 1))


def block_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(query · key^T · scale, where mask) · value, in bf16 with a float32 softmax.

    query [B, H, T, D]; key, value [B, KV, S, D] with H a multiple of KV (query head h reads kv head
    h // (H / KV)); mask None (every key visible) or bool [B or 1, 1, T, S], True where a query may
    attend. A query that sees no key gets zeros. Returns [B, H, T, D] in bf16; gradients come back in
    each input's dtype."""
    return _BlockAttention.apply(query, key, value, mask, float(scale))


def _grouped(x: Tensor, kv: int) -> Tensor:
    """[B, H, T, D] -> [B, KV, r·T, D] in bf16: the r query heads of a kv head as one block of rows."""
    b, h, t, d = x.shape
    return x.to(COMPUTE).reshape(b, kv, (h // kv) * t, d)


def _bias(mask: Tensor | None, r: int) -> Tensor | None:
    """The bool mask [b, 1, T, S] as an additive bf16 bias [b, 1, 1, T, S] (0 visible, -inf hidden)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=COMPUTE, device=mask.device).masked_fill_(~mask, float("-inf"))[
        :, :, None
    ]


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, scale):
        b, h, t, d = query.shape
        kv, width = key.shape[1], key.shape[2]
        r = h // kv
        q = _grouped(query.float() * scale, kv)
        k, v = key.to(COMPUTE).contiguous(), value.to(COMPUTE).contiguous()
        bias = _bias(None if mask is None else mask.expand(b, 1, t, width), r)
        out = torch.empty((b, kv, r * t, d), dtype=COMPUTE, device=query.device)
        probs = torch.empty((b, kv, r * t, width), dtype=COMPUTE, device=query.device)
        step = block_rows(h * t * width)
        for i in range(0, b, step):
            j = slice(i, i + step)
            s = q[j] @ k[j].transpose(-1, -2)
            if bias is not None:
                s = (s.view(-1, kv, r, t, width) + bias[j]).view(s.shape)
            p = torch.softmax(s, dim=-1, dtype=torch.float32)
            p = p.nan_to_num_(0.0) if bias is not None else p  # a query that sees no key: zeros
            probs[j] = p
            out[j] = probs[j] @ v[j]
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.shape, ctx.dtypes = scale, (b, h, t, d), (query.dtype, key.dtype, value.dtype)
        return out.view(b, kv, r, t, d).reshape(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        b, h, t, d = ctx.shape
        kv = k.shape[1]
        r = h // kv
        g = _grouped(grad_out, kv)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        step = block_rows(h * t * k.shape[2])
        for i in range(0, b, step):
            j = slice(i, i + step)
            p = probs[j]
            grad_v[j] = p.transpose(-1, -2) @ g[j]
            dp = g[j] @ v[j].transpose(-1, -2)
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, COMPUTE)  # P ∘ (dP − Σ dP ∘ P)
            grad_q[j] = ds @ k[j]
            grad_k[j] = ds.transpose(-1, -2) @ q[j]  # q holds query · scale
        query_dtype, key_dtype, value_dtype = ctx.dtypes
        grad_query = (grad_q.float() * ctx.scale).view(b, kv, r, t, d).reshape(b, h, t, d)
        return grad_query.to(query_dtype), grad_k.to(key_dtype), grad_v.to(value_dtype), None, None


ATTENTION_NAME = "trgrpo_cpu_attention"


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """A transformers attention function: `block_attention` under CPU bf16 autocast; elsewhere (and for
    what it does not cover: dropout, soft-capping, sliding windows, additive masks) SDPA in float32."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = any(
        kwargs.get(name) is not None for name in ("softcap", "sliding_window", "position_bias", "s_aux")
    )
    bool_mask = attention_mask is None or attention_mask.dtype == torch.bool
    autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", None) or 1
    fits = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] * layers <= MAX_KEPT
    if (
        not autocast
        or torch.get_autocast_dtype("cpu") != COMPUTE
        or dropout > 0
        or special
        or not bool_mask
        or not fits
    ):
        with torch.autocast(query.device.type, enabled=False):
            return sdpa_attention_forward(
                module,
                query.float(),
                key.float(),
                value.float(),
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
    t, width = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and t > 1 and causal:  # what SDPA's is_causal means: top-left aligned
        attention_mask = torch.ones(t, width, dtype=torch.bool, device=query.device).tril()[None, None]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = block_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def use_cpu_attention(model) -> bool:
    """Make an SDPA model's attention `_forward` (block attention under CPU bf16 autocast, SDPA in
    float32 otherwise). Returns whether it did. Without autocast it computes exactly what "sdpa" does.
    A model using another implementation, or a transformers without the attention registries, is left
    alone. The choice is not saved with the model's config."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model.config._attn_implementation == ATTENTION_NAME
    AttentionInterface.register(ATTENTION_NAME, _forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    return True
