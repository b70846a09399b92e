"""Sampling loop for the `hf` engine that reads each prompt's keys and values once per group.

The G samples of a prompt share its prefix. `generate` repeats the prompt's KV cache G times and, at
every new token, every row's attention reads its own copy of the prompt plus the whole (static)
cache length. Decoding one token for 128 rows is memory-bound on those reads. Here the prompt's keys
and values are stored once per prompt, and attention is computed in two blocks (cascade attention):
the G rows' queries of a group against the shared prompt, each row against its own generated tokens
so far, with one softmax over both. The same numbers as full attention up to float rounding (tested
against `generate`).

For Llama, Qwen2/3 and Mistral decoder layers a decode step runs the layers itself (`decode_step.Step`: the
model's own norms, rotary and weights, q/k/v and gate/up joined), optionally through torch.compile
(rollout.compile); other layers of a supported model type run the model's forward with only the
attention function swapped, through transformers' `AttentionInterface`. Architectures whose
attention goes through that interface with full (not sliding-window) attention are supported;
others use `generate` (`supports`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from trgrpo.models.body import decoder, dynamic_cache, with_cache
from trgrpo.rollout.cascade import Prefix, cascade
from trgrpo.rollout.decode_step import Step

ATTENTION_NAME = "trgrpo_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def supports(model) -> bool:
    """True where this model's layers are known to route attention through `AttentionInterface` with
    plain full attention (no sliding window, soft-capping or attention sinks)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return model.get_output_embeddings() is not None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **_):
    """One decode step (query length 1) through transformers' `AttentionInterface`; returns
    [rows, 1, heads, d]."""
    rows, heads, _, d = query.shape
    state, layer = shared_prefix, module.layer_idx
    state.store(layer, key[:, :, -1], value[:, :, -1])
    out = cascade(query[:, :, -1], *state.layer(layer), scaling=scaling)
    return out.to(query.dtype).reshape(rows, 1, heads, d), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)


@contextmanager
def _attention_swapped(model):
    config = model.config
    saved = config._attn_implementation
    _register()
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = saved


@torch.no_grad()
def sample(
    model,
    input_ids: Tensor,
    attention: Tensor,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    stop_check=None,
    fast: bool = True,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample `n` continuations of every left-padded prompt row; returns token ids and their log-probs
    (log-softmax of logits / temperature, full vocabulary), both [prompts * n, T], prompt-major.
    temperature 0 is greedy. Rows end at an EOS id (later positions hold `pad_id`); the loop stops
    when every row has ended or `stop_check(ids so far, live rows)` marks the rest ended. `fast`
    decodes with `decode_step.Step` where the model's layers allow (False: through the model's forward);
    `compile` runs that step's layers through torch.compile (`decode_step.Step`)."""
    body, head = decoder(model), model.get_output_embeddings()
    rows, device = input_ids.shape[0] * n, input_ids.device
    state = _prefill(model, input_ids, attention, n, max_new_tokens)
    token = input_ids[:, -1].repeat_interleave(n)
    position = (attention.sum(-1) - 1).repeat_interleave(n)
    eos = torch.tensor(eos_ids or [-1], device=device)
    out_ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((rows, max_new_tokens), device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)
    step = Step.build(model, state.new_keys[0].dtype, compile) if fast else None

    def forward(t: int) -> Tensor:
        if step is not None:
            return step(token, position + t, state)
        return body(
            input_ids=token[:, None],
            position_ids=(position + t)[:, None],
            use_cache=False,
            shared_prefix=state,
        ).last_hidden_state[:, -1]

    # The step casts for itself: autocast would only add its dispatch to every op.
    own_casts = torch.autocast(device.type, enabled=False) if step is not None else nullcontext()
    with _attention_swapped(model), own_casts:
        for t in range(max_new_tokens):
            state.advance(t)
            hidden = forward(t)
            with torch.autocast(device.type, enabled=False):  # the head in float32, as the learner's
                logits = head(hidden.to(head.weight.dtype)).float()
            scaled = logits / temperature if temperature > 0 and temperature != 1.0 else logits
            logprobs = torch.log_softmax(scaled, dim=-1)
            token = logits.argmax(-1) if temperature <= 0 else _draw(logprobs, top_p)
            token = torch.where(live, token, pad_id)
            out_ids[:, t] = token
            out_lp[:, t] = logprobs.gather(-1, token[:, None]).squeeze(-1)
            live &= ~torch.isin(token, eos)
            if stop_check is not None and live.any():
                live &= ~stop_check(out_ids[:, : t + 1], live)
            if not live.any():
                return out_ids[:, : t + 1], out_lp[:, : t + 1]
    return out_ids, out_lp


def _draw(logprobs: Tensor, top_p: float) -> Tensor:
    """One id per row from exp(logprobs), by inverse CDF: one uniform per row against the running
    sum of the probabilities. `torch.multinomial` draws an exponential variate for every vocabulary
    entry instead, 20-30x slower on CPU ([64, 49152]: ~85 ms against ~3-4 ms a step, a fifth of
    SmolLM2's generation). The sum runs in float64, so an id keeps its own probability down to
    ~1e-16 of the total (float32 would round ids below ~6e-8 to 0 or to 6e-8)."""
    probs = logprobs.exp()
    if top_p < 1.0:  # nucleus: the smallest set of most likely ids whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cumulative = probs.to(torch.float64).cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cumulative[:, -1:]
    # the first id whose running sum exceeds u: ids without mass never are (their sum equals the last)
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def prompt_cache(model, input_ids: Tensor, attention: Tensor):
    """A DynamicCache of every left-padded prompt row but its last token, which is the first decode
    step's input; None when the prompts are one token long."""
    mask = attention[:, :-1]
    if not mask.shape[1]:
        return None
    cache = dynamic_cache(model.config)
    body = decoder(model)
    body(
        input_ids=input_ids[:, :-1],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **with_cache(body, cache),
    )
    return cache


def _prefill(model, input_ids: Tensor, attention: Tensor, n: int, max_new_tokens: int) -> Prefix:
    """Every prompt but its last token through the model once (the last one is decode step 0)."""
    cache = prompt_cache(model, input_ids, attention)
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    prompts, device = input_ids.shape[0], input_ids.device
    # Keys and values in the precision the attention computes in (bfloat16 under the engine's
    # autocast), so no matmul casts the caches again at every step.
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    empty = torch.zeros((prompts, kv_heads, 0, head_dim), dtype=dtype, device=device)
    keys = [layer.keys.to(dtype) for layer in cache.layers] if cache is not None else [empty] * layers
    values = [layer.values.to(dtype) for layer in cache.layers] if cache is not None else [empty] * layers
    mask = attention[:, :-1]
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask == 0, float("-inf"))

    def buffer():
        return torch.zeros((prompts * n, kv_heads, max_new_tokens, head_dim), dtype=dtype, device=device)

    return Prefix(
        keys,
        values,
        bias[:, None, None, :],
        [buffer() for _ in range(layers)],
        [buffer() for _ in range(layers)],
        torch.full((max_new_tokens,), float("-inf"), dtype=dtype, device=device),
        n,
    )
