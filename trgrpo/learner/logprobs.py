"""Per-token log-probs and entropy of the response tokens, without a [B, T, V] float32 tensor.

The model's body gives hidden states; the lm_head, log-softmax and gather run over chunks of
`chunk` response tokens. Under autograd each chunk is checkpointed, so its logits are recomputed in
the backward pass instead of kept: peak memory is one chunk of logits, whatever the vocabulary.
log p is the log-softmax of logits / temperature over the full vocabulary (ALGORITHMS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trgrpo.learner.batch import MicroBatch


def _chunk_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float
) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _chunk_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """hidden [M, H], targets [M] → (logprobs [M], entropy [M] or None), chunked over M."""
    pieces, entropies = [], []
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        if grad:
            pieces.append(checkpoint(_chunk_logprobs, h, weight, bias, y, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, weight, bias, y, temperature))
        if with_entropy:
            entropies.append(
                _chunk_entropy(
                    h.detach(), weight.detach(), None if bias is None else bias.detach(), temperature
                )
            )
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.cat(pieces) if pieces else empty
    entropy = (torch.cat(entropies) if entropies else empty) if with_entropy else None
    return logprobs, entropy


def response_logprobs(
    model, mb: MicroBatch, *, temperature: float, chunk: int, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """[B, T] log-probs of mb.response_ids (0 where response_mask is False), and entropy [B, T] or None."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = body(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
    ).last_hidden_state
    p, t = mb.prompt_width, mb.response_ids.shape[1]
    hidden = hidden[:, p - 1 : p - 1 + t]  # the states that predict response tokens 0..T−1
    head = model.get_output_embeddings()
    flat_mask = mb.response_mask.reshape(-1)
    selected = hidden.reshape(-1, hidden.shape[-1])[flat_mask]
    targets = mb.response_ids.reshape(-1)[flat_mask]
    values, entropy = token_logprobs(
        selected,
        head.weight,
        head.bias,
        targets,
        temperature=temperature,
        chunk=chunk,
        with_entropy=with_entropy,
    )
    out = torch.zeros(mb.response_mask.shape, dtype=torch.float32, device=values.device)
    out = out.masked_scatter(mb.response_mask, values)
    if entropy is not None:
        entropy = torch.zeros_like(out).masked_scatter(mb.response_mask, entropy)
    return out, entropy
