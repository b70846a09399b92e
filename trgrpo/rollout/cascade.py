"""Cascade attention for one decode step of G samples per prompt, and the state it reads.

The prompt's keys and values are stored once per prompt and every row's generated keys and values
in a buffer of their own (`Prefix`); attention is computed in two blocks, the G rows' queries of a
group against the shared prompt and each row against its own generated tokens so far, with one
softmax over both (`cascade`). Used by the shared-prefix decoder (prefix_decode.py) both through
transformers' `AttentionInterface` and from its own decode step (decode_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Prefix:
    """Per layer: the prompts' keys/values [prompts, kv_heads, P, d] (left-padded), the additive mask
    [prompts, 1, 1, P] (-inf at padding), and every row's generated keys/values [rows, kv_heads, T, d]."""

    keys: list[Tensor]
    values: list[Tensor]
    bias: Tensor
    new_keys: list[Tensor]
    new_values: list[Tensor]
    future: Tensor  # [max_new_tokens] additive mask of the generated positions: 0 up to `step`, -inf after
    n: int  # rows per prompt
    step: int = 0  # index of the token being decoded

    def advance(self, t: int) -> None:
        self.step = t
        self.future[t] = 0.0

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        """This step's key and value [rows, kv_heads, d] of every row, at position `step`."""
        self.new_keys[layer][:, :, self.step] = key
        self.new_values[layer][:, :, self.step] = value

    def layer(self, layer: int) -> tuple[Tensor, ...]:
        """What `cascade` reads for one layer: own keys, own values, future mask, prompt keys, prompt
        values, prompt padding bias."""
        return (
            self.new_keys[layer],
            self.new_values[layer],
            self.future,
            self.keys[layer],
            self.values[layer],
            self.bias,
        )


def cascade(
    query: Tensor,
    own_k: Tensor,
    own_v: Tensor,
    future: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor,
    *,
    scaling: float | None,
) -> Tensor:
    """Cascade attention of one decode step: query [rows, heads, d]; each row's generated keys and
    values [rows, kv_heads, T, d] (this step's already stored) with `future` masking the positions not
    yet decoded; the prompts' keys and values [prompts, kv_heads, P, d] with their padding `bias`, each
    shared by rows / prompts consecutive rows. Returns [rows, heads, d] in the caches' dtype."""
    rows, heads, d = query.shape
    kv_heads = own_k.shape[1]
    r = heads // kv_heads
    prompts = keys.shape[0]
    n = rows // prompts
    scale = scaling if scaling is not None else d**-0.5
    dtype = own_k.dtype
    q = (query.reshape(rows, kv_heads, r, d) * scale).to(dtype)  # query heads under their kv head (GQA)
    # Each row against the whole buffer of its generated keys, the positions not yet decoded masked:
    # a slice [:t+1] would be copied into a contiguous tensor by every matmul, a growing copy per
    # layer and step that cost more than the attention itself (most of a bf16 decode on CPU).
    scores = q @ own_k.transpose(-1, -2) + future  # [rows, kv_heads, r, max_new_tokens]
    width = keys.shape[-2]
    if width:

        def by_prompt(x):  # [rows, kv_heads, r, k] -> [prompts, kv_heads, n*r, k]
            return x.view(prompts, n, kv_heads, r, -1).transpose(1, 2).reshape(prompts, kv_heads, n * r, -1)

        def by_row(x):  # the inverse of by_prompt
            return x.view(prompts, kv_heads, n, r, -1).transpose(1, 2).reshape(rows, kv_heads, r, -1)

        shared = by_prompt(q) @ keys.transpose(-1, -2) + bias
        scores = torch.cat([by_row(shared), scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = probs[..., width:] @ own_v
    if width:
        out = out + by_row(by_prompt(probs[..., :width]) @ values)
    return out.reshape(rows, heads, d)
