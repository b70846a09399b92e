"""Sampling loop for the `hf` engine that reads each prompt's keys and values once per group.

The G samples of a prompt share its prefix. `generate` repeats the prompt's KV cache G times and, at
every new token, every row's attention reads its own copy of the prompt plus the whole (static)
cache length. Decoding one token for 128 rows is memory-bound on those reads. Here the prompt's keys
and values are stored once per prompt, and attention is computed in two blocks (cascade attention):
the G rows' queries of a group against the shared prompt, each row against its own generated tokens
so far, with one softmax over both. The same numbers as full attention up to float rounding (tested
against `generate`).

For Llama, Qwen2/3 and Mistral decoder layers a decode step runs the layers itself (`_Step`: the
model's own norms, rotary and weights, q/k/v and gate/up joined), optionally through torch.compile
(rollout.compile); other layers of a supported model type run the model's forward with only the
attention function swapped, through transformers' `AttentionInterface`. Architectures whose
attention goes through that interface with full (not sliding-window) attention are supported;
others use `generate` (`supports`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from trgrpo.models.body import decoder, dynamic_cache, with_cache

ATTENTION_NAME = "trgrpo_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

log = logging.getLogger("trgrpo")


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


@dataclass
class _Prefix:
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
        """What `_cascade` reads for one layer: own keys, own values, future mask, prompt keys, prompt
        values, prompt padding bias."""
        return (
            self.new_keys[layer],
            self.new_values[layer],
            self.future,
            self.keys[layer],
            self.values[layer],
            self.bias,
        )


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **_):
    """One decode step (query length 1) through transformers' `AttentionInterface`; returns
    [rows, 1, heads, d]."""
    rows, heads, _, d = query.shape
    state, layer = shared_prefix, module.layer_idx
    state.store(layer, key[:, :, -1], value[:, :, -1])
    out = _cascade(query[:, :, -1], *state.layer(layer), scaling=scaling)
    return out.to(query.dtype).reshape(rows, 1, heads, d), None


def _cascade(
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


# Decoder layers whose forward `_Step` reproduces: pre-norm attention with rotary q and k (Qwen3:
# after a per-head RMSNorm of each) and a gated MLP, each added to the residual stream.
_STEP_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


@dataclass
class _Layer:
    attention: torch.nn.Module  # for its layer_idx, scaling and (Qwen3) q_norm / k_norm
    norms: tuple[torch.nn.Module, torch.nn.Module]  # before attention, before the MLP
    qkv: tuple[Tensor, Tensor | None]  # q, k and v projections as one (weight, bias)
    out: tuple[Tensor, Tensor | None]
    gate_up: tuple[Tensor, Tensor | None]  # gate and up projections as one
    down: tuple[Tensor, Tensor | None]
    act: object


def _joined(linears, dtype) -> tuple[Tensor, Tensor | None]:
    """The linears' weights (and biases) stacked into one, in `dtype`: one matmul for all of them."""
    weight = linears[0].weight if len(linears) == 1 else torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = None if biases[0] is None else biases[0] if len(linears) == 1 else torch.cat(biases)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _layer_input(hidden, norm, qkv, q_norm, k_norm, cos, sin, heads: int, kv_heads: int, dtype):
    """A decoder layer's attention input for one token per row: q [rows, heads, d] and k, v
    [rows, kv_heads, d]; q and k after (Qwen3: per-head RMSNorm and) rotary, in the stream's dtype."""
    rows, d = hidden.shape[0], cos.shape[-1]
    mixed = torch.nn.functional.linear(norm(hidden).to(dtype), *qkv)
    qk = mixed[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d)
    if q_norm is not None:
        qk = torch.cat([q_norm(qk[:, :heads]), k_norm(qk[:, heads:])], dim=1)
    half = d // 2
    qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
    return qk[:, :heads], qk[:, heads:], mixed[:, (heads + kv_heads) * d :].view(rows, kv_heads, d)


def _layer_output(hidden, query, attended, scaling, out, norm, gate_up, down, act, dtype):
    """The rest of the layer once this step's keys and values are stored: cascade attention over
    `attended` (`_Prefix.layer`), the output projection and the gated MLP, each added to the stream."""
    a = _cascade(query, *attended, scaling=scaling)
    hidden = hidden + torch.nn.functional.linear(a.reshape(hidden.shape[0], -1), *out)
    gate, up = torch.nn.functional.linear(norm(hidden).to(dtype), *gate_up).chunk(2, -1)
    return hidden + torch.nn.functional.linear(act(gate) * up, *down)


# torch.compile'd `_layer_input` and `_layer_output`, made once per process: every layer of every
# model of the same architecture and shapes reuses one compiled graph each (dynamo guards on the
# modules' classes and the tensors' shapes, not on which layer passes them).
_COMPILED: dict[str, object] = {}
_compile_failed: list[str] = []  # why compilation failed in this process (then every step runs eager)


def _compiled_layer():
    if not _COMPILED:
        _COMPILED["input"] = torch.compile(_layer_input, dynamic=None)
        _COMPILED["output"] = torch.compile(_layer_output, dynamic=None)
    return _COMPILED["input"], _COMPILED["output"]


class _Step:
    """One decode step of the whole body, for the decoder layers in `_STEP_LAYERS`, without
    transformers' per-call machinery (keyword plumbing, masks, hooks: most of the ~1,150 ops a step of
    the ~10M bench model issued) and with q/k/v and gate/up each as one matmul.

    The numbers are those of the model's own forward under the engine's autocast: the same residual
    stream (the parameters' dtype), the same RMSNorm and rotary modules, matmuls in `dtype` with their
    outputs added to the stream, and q and k after rotary in the stream's dtype (tested against the
    transformers path). The joined weights are copies in `dtype`, made per `sample` call (the weights
    change at every optimizer step): under bf16 they take the place of the bf16 copies autocast would
    cache; in fp32 they are three quarters of the body's size, less than the gradients an update holds.

    `compile` (rollout.compile) runs each layer's two halves through `torch.compile` (inductor): the
    norms, rotary, masking, softmax and SwiGLU fuse into a few kernels around the matmuls (0.65x of
    the eager sampling time on the ~10M bench model, docs/BENCHMARKS.md). The first call per new shape
    compiles (~10-15 s on 2 cores, ~2 s from inductor's on-disk cache); fused kernels round bf16
    intermediates once instead of per op, so samples are not bit-identical to the eager step's (the
    same distribution; tested close to the model's forward). Shapes are compiled static and torch
    marks a size dynamic when it first changes (a new prompt width: one more compile of ~3 s); marking
    the varying sizes dynamic from the first call avoids that but ran 0.72-0.79x of eager against
    0.62-0.68x. A resumed run compiles in another order and logs what the uninterrupted run logged
    (tests/test_resume.py). Where compilation fails (no C++ compiler, an inductor error) the step logs
    why once and runs eager for the rest of the process."""

    def __init__(self, body, dtype: torch.dtype, compile: bool = False):
        self.body, self.dtype, self.compile = body, dtype, compile and not _compile_failed
        self.layers = []
        for layer in body.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    attention,
                    (layer.input_layernorm, layer.post_attention_layernorm),
                    _joined([attention.q_proj, attention.k_proj, attention.v_proj], dtype),
                    _joined([attention.o_proj], dtype),
                    _joined([mlp.gate_proj, mlp.up_proj], dtype),
                    _joined([mlp.down_proj], dtype),
                    mlp.act_fn,
                )
            )
        config = body.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads

    @classmethod
    def build(cls, model, dtype: torch.dtype, compile: bool = False) -> _Step | None:
        """The step for this model, or None where its layers are not ones it reproduces."""
        body = decoder(model)
        if not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        if any(type(layer).__name__ not in _STEP_LAYERS for layer in body.layers):
            return None
        return cls(body, dtype, compile)

    def __call__(self, token: Tensor, position: Tensor, state: _Prefix) -> Tensor:
        """The final hidden state [rows, hidden] of each row's next token at its position."""
        if self.compile:
            try:
                return self._run(token, position, state, *_compiled_layer())
            except Exception as err:  # any compiler failure: decode eager instead
                _compile_failed.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
                log.warning(
                    "rollout.compile: torch.compile of the decode step failed (%s); decoding without it "
                    "(set rollout.compile=false to skip the attempt)",
                    _compile_failed[0],
                )
                self.compile = False
        # Eager. After a failed compiled step it is recomputed whole: it rewrites the same cache slots.
        return self._run(token, position, state, _layer_input, _layer_output)

    def _run(self, token: Tensor, position: Tensor, state: _Prefix, layer_input, layer_output) -> Tensor:
        hidden = self.body.embed_tokens(token)
        cos, sin = self.body.rotary_emb(hidden, position[:, None])  # [rows, 1, d], the stream's dtype
        for i, layer in enumerate(self.layers):
            attention = layer.attention
            q, k, v = layer_input(
                hidden,
                layer.norms[0],
                layer.qkv,
                getattr(attention, "q_norm", None),
                getattr(attention, "k_norm", None),
                cos,
                sin,
                self.heads,
                self.kv_heads,
                self.dtype,
            )
            state.store(i, k, v)
            hidden = layer_output(
                hidden,
                q,
                state.layer(i),
                attention.scaling,
                layer.out,
                layer.norms[1],
                layer.gate_up,
                layer.down,
                layer.act,
                self.dtype,
            )
        return self.body.norm(hidden)


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
    decodes with `_Step` where the model's layers allow (False: through the model's forward);
    `compile` runs that step's layers through torch.compile (`_Step`)."""
    body, head = decoder(model), model.get_output_embeddings()
    rows, device = input_ids.shape[0] * n, input_ids.device
    state = _prefill(model, input_ids, attention, n, max_new_tokens)
    token = input_ids[:, -1].repeat_interleave(n)
    position = (attention.sum(-1) - 1).repeat_interleave(n)
    eos = torch.tensor(eos_ids or [-1], device=device)
    out_ids = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((rows, max_new_tokens), device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)
    step = _Step.build(model, state.new_keys[0].dtype, compile) if fast else None

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


def _prefill(model, input_ids: Tensor, attention: Tensor, n: int, max_new_tokens: int) -> _Prefix:
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

    return _Prefix(
        keys,
        values,
        bias[:, None, None, :],
        [buffer() for _ in range(layers)],
        [buffer() for _ in range(layers)],
        torch.full((max_new_tokens,), float("-inf"), dtype=dtype, device=device),
        n,
    )
