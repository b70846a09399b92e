"""The shared-prefix decoder's own decode step for Llama-family layers (`Step`), optionally through
torch.compile (rollout.compile)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from trgrpo.models.body import decoder
from trgrpo.rollout.cascade import Prefix, cascade

log = logging.getLogger("trgrpo")

# Decoder layers whose forward `Step` reproduces: pre-norm attention with rotary q and k (Qwen3:
# after a per-head RMSNorm of each) and a gated MLP, each added to the residual stream.
STEP_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


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
    `attended` (`Prefix.layer`), the output projection and the gated MLP, each added to the stream."""
    a = cascade(query, *attended, scaling=scaling)
    hidden = hidden + torch.nn.functional.linear(a.reshape(hidden.shape[0], -1), *out)
    gate, up = torch.nn.functional.linear(norm(hidden).to(dtype), *gate_up).chunk(2, -1)
    return hidden + torch.nn.functional.linear(act(gate) * up, *down)


# torch.compile'd `_layer_input` and `_layer_output`, made once per process: every layer of every
# model of the same architecture and shapes reuses one compiled graph each (dynamo guards on the
# modules' classes and the tensors' shapes, not on which layer passes them).
_compile_failed: list[str] = []  # why compilation failed in this process (then every step runs eager)


@functools.cache
def _compiled_layer():
    return torch.compile(_layer_input, dynamic=None), torch.compile(_layer_output, dynamic=None)


class Step:
    """One decode step of the whole body, for the decoder layers in `STEP_LAYERS`, without
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
    def build(cls, model, dtype: torch.dtype, compile: bool = False) -> Step | None:
        """The step for this model, or None where its layers are not ones it reproduces."""
        body = decoder(model)
        if not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        if any(type(layer).__name__ not in STEP_LAYERS for layer in body.layers):
            return None
        return cls(body, dtype, compile)

    def __call__(self, token: Tensor, position: Tensor, state: Prefix) -> Tensor:
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

    def _run(self, token: Tensor, position: Tensor, state: Prefix, layer_input, layer_output) -> Tensor:
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
