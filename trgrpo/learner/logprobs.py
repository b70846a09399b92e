"""Per-token log-probs and entropy of the response tokens, without a [B, T, V] float32 tensor.

The model's body gives hidden states; the lm_head, log-softmax and gather run over chunks of
`chunk` response tokens, each in one autograd function (`_HeadLogprobs`) that goes over the
vocabulary in blocks of VOCAB_BLOCK ids and whose backward recomputes its logits instead of keeping
them: peak memory is one [chunk, block] buffer of logits, whatever the vocabulary.
log p is the log-softmax of logits / temperature over the full vocabulary (ALGORITHMS.md).

With precision "bf16" the model body runs under autocast (bfloat16 matmuls, float32 weights and
residual stream); the lm_head and log-softmax stay in float32, so only the hidden states carry bf16
rounding. Autocast state is recorded by checkpointing, so recomputation in backward matches forward.
On CPU the learner's attention under bf16 is `attention.block_attention` (bf16 matmuls, float32
softmax, in blocks of rows; `use_cpu_attention`): torch's SDPA kernels are slow there in either
precision for these shapes (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trgrpo.learner.batch import MicroBatch
from trgrpo.models.body import decoder, dynamic_cache, select_rows, with_cache

# Vocabulary ids per block of the head: a chunk's float32 logits are [chunk, VOCAB_BLOCK] at most
# (64 MB at 1,024 tokens), whatever the vocabulary (SmolLM2's 49,152: 3 blocks; Qwen's 151,936: 10).
VOCAB_BLOCK = 16384


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) of one chunk of tokens through the lm_head, and (if asked) the entropy, in
    blocks of `block` vocabulary ids; the backward recomputes each block's logits instead of keeping
    them.

    Each block gives its log-normaliser lse_b and (for the entropy) its own softmax-weighted mean
    logit e_b = Σ_{i∈b} softmax_b(l)_i l_i; then lse = logsumexp_b(lse_b), log p(y) = l_y − lse and
    H = −Σ p log p = lse − Σ_b exp(lse_b − lse) e_b. The forward keeps only lse (one float per token);
    the backward forms d log p / d logits = onehot − softmax block by block in the recomputed logits'
    buffer, then the two matmuls into the block's rows of the weight's gradient. At T = 1 no division
    is made. Peak memory: one [chunk, block] float32 buffer (two with the entropy), whatever the
    vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool, block: int):
        target_logit = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        lses, means = [], []
        for start in range(0, weight.shape[0], block):
            logits = _logits(hidden, *_rows(weight, bias, start, block), temperature)
            width = logits.shape[1]
            lse_b = torch.logsumexp(logits, dim=-1)
            inside = (targets >= start) & (targets < start + width)
            picked = logits.gather(-1, (targets - start).clamp(0, width - 1)[:, None]).squeeze(-1)
            target_logit = torch.where(inside, picked, target_logit)
            lses.append(lse_b)
            if with_entropy:  # Σ softmax_b · l, no [chunk, block] product kept
                means.append(torch.linalg.vecdot((logits - lse_b[:, None]).exp_(), logits))
        lse_blocks = torch.stack(lses, dim=-1)
        lse = torch.logsumexp(lse_blocks, dim=-1)
        logprobs = target_logit - lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.block = temperature, block
        if not with_entropy:
            return logprobs, None
        entropy = lse - torch.linalg.vecdot((lse_blocks - lse[:, None]).exp(), torch.stack(means, dim=-1))
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        grad_weight = torch.empty_like(weight) if need[1] else None
        grad_bias = torch.empty_like(bias) if bias is not None and need[2] else None
        for start in range(0, weight.shape[0], ctx.block):
            rows, rows_bias = _rows(weight, bias, start, ctx.block)
            grad = _logits(hidden, rows, rows_bias, ctx.temperature)
            width = grad.shape[1]
            grad.sub_(lse[:, None]).exp_().mul_(-grad_logprobs[:, None])  # −g · softmax
            inside = (targets >= start) & (targets < start + width)
            at = (targets - start).clamp(0, width - 1)[:, None]
            grad.scatter_add_(-1, at, (grad_logprobs * inside)[:, None])  # + g at the target
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden.addmm_(grad, rows)
            if grad_weight is not None:
                torch.mm(grad.T, hidden, out=grad_weight[start : start + width])
            if grad_bias is not None:
                grad_bias[start : start + width] = grad.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _rows(weight: Tensor, bias: Tensor | None, start: int, block: int) -> tuple[Tensor, Tensor | None]:
    """The head's vocabulary rows start .. start + block (views, no copy)."""
    return weight[start : start + block], None if bias is None else bias[start : start + block]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """[M, V] float32 logits / temperature, in a buffer the caller may overwrite."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
    vocab_block: int = VOCAB_BLOCK,
) -> tuple[Tensor, Tensor | None]:
    """hidden [M, H], targets [M] → (logprobs [M], entropy [M] or None), chunked over M (`chunk`
    tokens) and over the vocabulary (`vocab_block` ids)."""
    pieces, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        logprobs, entropy = _HeadLogprobs.apply(
            h, weight, bias, y, float(temperature), with_entropy, vocab_block
        )
        pieces.append(logprobs)
        if with_entropy:
            entropies.append(entropy)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.cat(pieces) if pieces else empty
    entropy = (torch.cat(entropies) if entropies else empty) if with_entropy else None
    return logprobs, entropy


def response_logprobs(
    model,
    mb: MicroBatch,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
    precision: str = "fp32",
    body=None,
    share_prompts: bool = False,
    padding_free: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """[B, T] log-probs of mb.response_ids (0 where response_mask is False), and entropy [B, T] or None.

    precision: "fp32", or "bf16" for autocast of the model body (the head stays float32).
    body: what runs the body (default `decoder(model)`; the Scorer passes its compiled one).
    share_prompts: run each distinct prompt of the micro-batch through the body once (`_shared_body`).
    padding_free: run the micro-batch's real tokens as one packed row (`_packed_body`; before sharing).
    """
    assert precision in ("fp32", "bf16"), f"precision={precision!r}: expected fp32 or bf16"
    body = body if body is not None else decoder(model)
    device_type = mb.input_ids.device.type
    p, t = mb.prompt_width, mb.response_ids.shape[1]
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if padding_free:
            hidden = _packed_body(body, mb)[:, p - 1 : p - 1 + t]
        elif share_prompts and mb.owner is not None:
            hidden = _shared_body(body, model.config, mb)
        else:
            hidden = body(
                input_ids=mb.input_ids,
                attention_mask=mb.attention_mask,
                position_ids=mb.position_ids,
                use_cache=False,  # one full pass: a KV cache would only hold memory
            ).last_hidden_state
            hidden = hidden[:, p - 1 : p - 1 + t]  # the states that predict response tokens 0..T−1
    head = model.get_output_embeddings()
    flat_mask = mb.response_mask.reshape(-1)
    selected = hidden.reshape(-1, hidden.shape[-1])[flat_mask]
    selected = selected.to(head.weight.dtype)  # the head runs outside autocast, in the weights' dtype
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


def _packed_body(body, mb: MicroBatch) -> Tensor:
    """[B, L, H] hidden states (zero at padding), computed from the real tokens packed into one row.

    Position ids restart at 0 for every sequence, which is how transformers recognises packed
    sequences without an attention mask: flash attention then runs its varlen kernel (compute and
    memory for the real tokens only), SDPA and eager a block-diagonal causal mask. Equal to the
    padded forward up to float rounding (tested on CPU with SDPA).
    """
    real = mb.attention_mask.bool()
    packed = body(
        input_ids=mb.input_ids[real].unsqueeze(0),
        position_ids=mb.position_ids[real].unsqueeze(0),
        use_cache=False,
    ).last_hidden_state[0]
    return packed.new_zeros(*real.shape, packed.shape[-1]).masked_scatter(real.unsqueeze(-1), packed)


def uses_varlen_attention(model) -> bool:
    """Whether the model's attention implementation is a flash-attention one (varlen kernels)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def _shared_body(body, config, mb: MicroBatch) -> Tensor:
    """[B, T, H]: the hidden states that predict the response tokens, with each distinct prompt run once.

    The G samples of a group share their prompt, so its keys and values are computed once (under
    autograd: the gradient of every sample flows back into the one prompt pass), selected per row, and
    the responses run on top of them as a continuation. Same values as the one-pass forward up to
    float rounding (tested); saves (G − 1)/G of the prompt tokens' forward and backward.
    """
    p, t = mb.prompt_width, mb.response_ids.shape[1]
    cache = dynamic_cache(config)
    first = mb.first
    prompt = body(
        input_ids=mb.input_ids[first, :p],
        attention_mask=mb.attention_mask[first, :p],
        position_ids=mb.position_ids[first, :p],
        use_cache=True,
        **with_cache(body, cache),
    ).last_hidden_state
    last = prompt[:, -1:].index_select(0, mb.owner)  # [B, 1, H]: predicts response token 0
    if t == 1:
        return last
    select_rows(cache, mb.owner)
    rest = body(
        input_ids=mb.input_ids[:, p : p + t - 1],
        attention_mask=mb.attention_mask[:, : p + t - 1],
        position_ids=mb.position_ids[:, p : p + t - 1],
        use_cache=True,
        **with_cache(body, cache),
    ).last_hidden_state
    return torch.cat([last, rest], dim=1)


class Scorer(torch.nn.Module):
    """A causal LM as a module whose forward is `response_logprobs` (same arguments, after `mb`).

    The learner calls its models through one. It matters under FSDP2 (learner/fsdp.py), where the
    scorer is the root unit: the body and the head, called separately above, then run inside one
    forward, so the root's parameters (embeddings, head) are gathered for both.
    """

    def __init__(self, model, *, compile: bool = False):
        """compile: run the body through `torch.compile` (dynamic shapes: micro-batch sizes vary), which
        fuses its elementwise ops (norms, rotary, activations) and their backward into few kernels. The
        compiled module is held outside the module tree, so the scorer's parameters stay the model's."""
        super().__init__()
        self.model = model
        self._body = (torch.compile(decoder(model), dynamic=True) if compile else None,)

    def forward(self, mb: MicroBatch, **kwargs) -> tuple[Tensor, Tensor | None]:
        return response_logprobs(self.model, mb, body=self._body[0], **kwargs)
