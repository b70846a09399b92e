"""The hf engine's shared-prefix decoder (rollout/prefix_decode.py) against transformers' `generate`
and against teacher-forced log-probs: the cascade attention over a prompt stored once per group must
give the model's own distribution (prompts of different lengths, so left padding is covered; GQA and
query/key-norm architectures too)."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from conftest import make_cfg

from trgrpo.config.schema import ConfigError
from trgrpo.config.validation import problems
from trgrpo.models.chat import encode_prompt
from trgrpo.rollout import decode_step, prefix_decode
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run.records import Sampling

GREEDY = Sampling(temperature=0.0, max_new_tokens=12, n=3)


def _prompts(tokenizer) -> list[list[int]]:
    texts = [f"What is {i} + {3 * i}?" + " Think." * (2 * i) for i in range(3)]
    return [encode_prompt(tokenizer, t) for t in texts] + [
        encode_prompt(tokenizer, "")[-1:]
    ]  # a 1-token prompt


def _random_model(kind: str, vocab: int):
    """A freshly initialised small model of another architecture, on the tiny tokenizer's vocabulary."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if kind == "qwen3":  # grouped-query attention, query/key norms, explicit head_dim
        model = Qwen3ForCausalLM(
            Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common)
        )
    elif kind == "qwen2":  # attention biases, grouped-query attention
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=1, **common))
    elif kind == "llama-bias":  # biases on every projection, the MLP's too
        model = LlamaForCausalLM(
            LlamaConfig(
                num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True, **common
            )
        )
    elif kind == "mistral-full":  # without a sliding window: full attention, supported
        model = MistralForCausalLM(
            MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
        )
    else:  # sliding-window attention: not supported, `auto` falls back to generate
        model = MistralForCausalLM(
            MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, **common)
        )
    return model.eval()


@pytest.fixture(params=["llama", "qwen3", "qwen2"])
def model_and_tokenizer(request, tiny):
    model, tokenizer, _ = tiny
    if request.param != "llama":
        model = _random_model(request.param, model.config.vocab_size)
    assert prefix_decode.supports(model)
    return model, tokenizer


def test_greedy_equals_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer)
    ours = HFEngine(model, tokenizer, decode="shared_prefix").generate(prompts, GREEDY)
    theirs = HFEngine(model, tokenizer, decode="generate").generate(prompts, GREEDY)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in theirs]
    for a, b in zip(ours, theirs):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_sampled_logprobs_are_the_teacher_forced_ones(model_and_tokenizer):
    """Sampling at temperature 0.7: every recorded log-prob equals log-softmax(logits / 0.7) of one
    plain forward pass over that prompt and completion (no cache, no padding)."""
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer)
    sampling = Sampling(temperature=0.7, max_new_tokens=10, n=4, seed=3)
    completions = HFEngine(model, tokenizer, decode="shared_prefix").generate(prompts, sampling)
    assert len(completions) == len(prompts) * 4
    for k, c in enumerate(completions):
        prompt = prompts[k // 4]
        ids = torch.tensor([prompt + list(c.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-5), k


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2", "llama-bias", "mistral-full"])
def test_decode_step_equals_the_models_own_forward(tiny, kind, precision):
    """`decode_step.Step` (joined projections, no transformers machinery per token) samples the same tokens with
    the same log-probs as decoding through the model's forward, in fp32 and under bf16 autocast, for
    every architecture it claims; and it is the path taken."""
    model, tokenizer, _ = tiny
    if kind != "llama":
        model = _random_model(kind, model.config.vocab_size)
    assert prefix_decode.supports(model) and decode_step.Step.build(model, torch.float32) is not None
    ids, attention = _left_padded(_prompts(tokenizer), tokenizer.pad_token_id)
    calls = []
    step_call = decode_step.Step.__call__

    def draw(fast: bool):
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return prefix_decode.sample(
                model,
                ids,
                attention,
                n=3,
                max_new_tokens=9,
                temperature=1.0,
                top_p=1.0,
                eos_ids=[tokenizer.eos_token_id],
                pad_id=tokenizer.pad_token_id,
                fast=fast,
            )

    def spy(self, *args):
        calls.append(self.dtype)
        return step_call(self, *args)

    decode_step.Step.__call__ = spy
    try:
        fast_ids, fast_lp = draw(True)
        assert calls and set(calls) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        calls.clear()
        slow_ids, slow_lp = draw(False)
        assert not calls
    finally:
        decode_step.Step.__call__ = step_call
    assert torch.equal(fast_ids, slow_ids)
    assert torch.allclose(fast_lp, slow_lp, atol=1e-5 if precision == "fp32" else 1e-3)


def test_layers_the_step_does_not_know_decode_through_the_model(tiny, monkeypatch):
    """A decoder layer class outside `decode_step.STEP_LAYERS` (a new architecture, a subclass) is never run by
    `Step`: sampling goes through the model's own forward and gives the same tokens."""
    model, tokenizer, _ = tiny
    engine = HFEngine(model, tokenizer, decode="shared_prefix")
    sampling = Sampling(max_new_tokens=8, n=2, seed=4)
    expected = engine.generate(_prompts(tokenizer), sampling)
    monkeypatch.setattr(decode_step, "STEP_LAYERS", ("SomeOtherDecoderLayer",))
    assert decode_step.Step.build(model, torch.float32) is None
    monkeypatch.setattr(decode_step.Step, "__call__", lambda *a: pytest.fail("Step ran"))
    assert engine.generate(_prompts(tokenizer), sampling) == expected


def test_sampling_is_reproducible_from_its_seed(tiny):
    model, tokenizer, _ = tiny
    engine = HFEngine(model, tokenizer, decode="shared_prefix")
    prompts = _prompts(tokenizer)

    def draw(seed):
        return [c.token_ids for c in engine.generate(prompts, Sampling(max_new_tokens=8, n=4, seed=seed))]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_p_draws_from_the_nucleus_only():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.8 keeps the first two (their mass reaches 0.8),
    renormalised to 0.625 / 0.375; top_p = 0.81 also keeps the third."""
    logprobs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(prefix_decode._draw(logprobs, 0.8), minlength=4) / 20000
    assert counts[2:].sum() == 0
    assert abs(counts[0] - 0.625) < 0.02
    counts = torch.bincount(prefix_decode._draw(logprobs, 0.81), minlength=4) / 20000
    assert counts[3] == 0 and abs(counts[2] - 0.15 / 0.95) < 0.02
    counts = torch.bincount(prefix_decode._draw(logprobs, 1.0), minlength=4) / 20000
    assert abs(counts[3] - 0.05) < 0.01


def test_draw_follows_the_distribution_and_never_draws_zero_mass():
    """Probabilities 0, 0.5, 0, 0.3, 0.2, 0 (zeros first, inside and last): about half the draws are
    id 1, 0.3 id 3, 0.2 id 4, and never an id without mass; a one-hot row always draws its id."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logprobs = probs.log().expand(40000, 6)
    torch.manual_seed(0)
    counts = torch.bincount(prefix_decode._draw(logprobs, 1.0), minlength=6) / 40000
    assert counts[0] == counts[2] == counts[5] == 0
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    one_hot = torch.tensor([0.0, 0.0, 0.0, 1.0]).log().expand(1000, 4)
    assert (prefix_decode._draw(one_hot, 1.0) == 3).all()


def test_stop_strings_end_rows_like_generate(tiny):
    model, tokenizer, _ = tiny
    prompts = _prompts(tokenizer)
    free = HFEngine(model, tokenizer, decode="generate").generate(prompts, GREEDY)
    text = max((c.text for c in free), key=len)
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # occurs in at least one completion
    sampling = Sampling(temperature=0.0, max_new_tokens=12, n=3, stop=(stop,))
    ours = HFEngine(model, tokenizer, decode="shared_prefix").generate(prompts, sampling)
    theirs = HFEngine(model, tokenizer, decode="generate").generate(prompts, sampling)
    assert [(c.token_ids, c.finish_reason) for c in ours] == [(c.token_ids, c.finish_reason) for c in theirs]
    assert any(stop in c.text and c.finish_reason == "stop" for c in ours)


def test_unsupported_models_use_generate(tiny):
    _, tokenizer, _ = tiny
    model = _random_model("mistral", len(tokenizer))
    assert not prefix_decode.supports(model)
    engine = HFEngine(model, tokenizer)  # auto
    assert not engine.shared_prefix
    assert len(engine.generate(_prompts(tokenizer), GREEDY)) == 12
    with pytest.raises(ConfigError, match=r"rollout\.hf_decode=auto or generate"):
        HFEngine(model, tokenizer, decode="shared_prefix")


def test_attention_implementation_is_restored(tiny):
    model, tokenizer, _ = tiny
    before = model.config._attn_implementation
    HFEngine(model, tokenizer, decode="shared_prefix").generate(_prompts(tokenizer)[:1], GREEDY)
    assert model.config._attn_implementation == before


def test_unknown_decoder_name_is_refused():
    found = problems(make_cfg("rollout.hf_decode=fast"))
    assert any(
        "rollout.hf_decode='fast' is not valid; choose one of: auto, shared_prefix, generate" in p
        for p in found
    )


@pytest.mark.parametrize("decode", ["shared_prefix", "generate"])
def test_bf16_generation_runs_the_body_in_bf16_and_the_head_in_fp32(tiny, decode):
    """trainer.precision=bf16 reaches the sampler: the body's matmuls run in bfloat16 (as the learner's
    under autocast) and the head in float32; the weights stay float32 and fp32 sampling is unchanged."""
    model, tokenizer, _ = tiny
    prompts = [encode_prompt(tokenizer, f"{i} + {i + 3} =") for i in range(3)]
    sampling = Sampling(temperature=1.0, max_new_tokens=6, n=2, seed=5)
    seen: dict[str, set] = {"body": set(), "head": set()}
    hooks = [
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen["body"].add(o.dtype)),
        model.lm_head.register_forward_hook(lambda m, i, o: seen["head"].add(o.dtype)),
    ]
    try:
        fp32 = HFEngine(model, tokenizer, decode=decode).generate(prompts, sampling)
        assert seen == {"body": {torch.float32}, "head": {torch.float32}}
        seen["body"].clear(), seen["head"].clear()
        bf16 = HFEngine(model, tokenizer, decode=decode, precision="bf16").generate(prompts, sampling)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["body"] == {torch.bfloat16}
    if decode == "shared_prefix":
        assert seen["head"] == {torch.float32}
    assert next(model.parameters()).dtype == torch.float32
    assert len(bf16) == len(fp32) and all(all(map(math.isfinite, c.logprobs)) for c in bf16)
    assert fp32 == HFEngine(model, tokenizer, decode=decode).generate(prompts, sampling)


def test_bf16_caches_are_bf16_and_logprobs_stay_close_to_fp32(tiny, monkeypatch):
    """Under bf16 the decoder keeps its key/value caches in bfloat16 (no per-step casts of the whole
    cache), and each sampled token's log-prob stays within bf16 rounding of the fp32 teacher-forced one."""
    model, tokenizer, _ = tiny
    prompts = _prompts(tokenizer)
    states = []
    prefill = prefix_decode._prefill

    def spy(*args, **kwargs):
        states.append(prefill(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(prefix_decode, "_prefill", spy)
    sampling = Sampling(temperature=1.0, max_new_tokens=10, n=4, seed=3)
    completions = HFEngine(model, tokenizer, decode="shared_prefix", precision="bf16").generate(
        prompts, sampling
    )
    (state,) = states
    tensors = [*state.keys, *state.values, *state.new_keys, *state.new_values, state.bias, state.future]
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    for k, c in enumerate(completions):
        prompt = prompts[k // 4]
        ids = torch.tensor([prompt + list(c.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=0.1), k


def _teacher_forced(model, prompts, completions, n: int) -> list[torch.Tensor]:
    """Each completion's log-probs from one plain fp32 forward over prompt + completion."""
    out = []
    for k, c in enumerate(completions):
        prompt = prompts[k // n]
        ids = torch.tensor([prompt + list(c.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1))
    return out


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None, reason="inductor needs a C++ compiler on CPU"
)
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_compiled_decode_step_samples_the_models_distribution(tiny, kind, monkeypatch):
    """rollout.compile: the decode step's layers through torch.compile. In fp32 the same tokens and
    log-probs as the eager step (fusion changes only float32 rounding); under bf16 (where fused kernels
    round once instead of per op) every sampled token's log-prob within bf16 rounding of the fp32
    teacher-forced one. The compiled path is the one taken, and nothing fell back."""
    model, tokenizer, _ = tiny
    if kind != "llama":
        model = _random_model(kind, model.config.vocab_size)
    prompts = _prompts(tokenizer)
    sampling = Sampling(temperature=1.0, max_new_tokens=10, n=3, seed=7)
    used = []
    compiled_layer = decode_step._compiled_layer
    monkeypatch.setattr(decode_step, "_compiled_layer", lambda: used.append(1) or compiled_layer())
    monkeypatch.setattr(decode_step, "_compile_failed", [])
    eager = HFEngine(model, tokenizer, decode="shared_prefix").generate(prompts, sampling)
    assert not used
    compiled = HFEngine(model, tokenizer, decode="shared_prefix", compile=True).generate(prompts, sampling)
    assert used and not decode_step._compile_failed
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    for a, b in zip(compiled, eager):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    bf16 = HFEngine(model, tokenizer, decode="shared_prefix", precision="bf16", compile=True)
    completions = bf16.generate(prompts, sampling)
    assert not decode_step._compile_failed
    for c, expected in zip(completions, _teacher_forced(model, prompts, completions, 3)):
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=0.1)


def test_a_decode_step_that_cannot_compile_decodes_eager_and_says_so_once(tiny, monkeypatch, caplog):
    """No C++ compiler, an inductor error: the failing step is recomputed eager (it rewrites the same
    cache slots), one warning names the cause and the fix, and later steps and calls stay eager."""
    model, tokenizer, _ = tiny
    prompts = _prompts(tokenizer)
    sampling = Sampling(temperature=1.0, max_new_tokens=8, n=2, seed=1)
    expected = HFEngine(model, tokenizer, decode="shared_prefix").generate(prompts, sampling)
    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")

    monkeypatch.setattr(decode_step, "_compiled_layer", lambda: (broken, broken))
    monkeypatch.setattr(decode_step, "_compile_failed", [])
    engine = HFEngine(model, tokenizer, decode="shared_prefix", compile=True)
    with caplog.at_level("WARNING", logger="trgrpo"):
        assert engine.generate(prompts, sampling) == expected
        assert engine.generate(prompts, sampling) == expected
    assert len(attempts) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "rollout.compile: torch.compile of the decode step failed (RuntimeError: InvalidCxxCompiler: No "
        "working C++ compiler found); decoding without it (set rollout.compile=false to skip the attempt)"
    ]


def test_rollout_compile_auto_compiles_on_cpu_where_a_compiler_is_found(monkeypatch, caplog):
    from trgrpo.config.schema import RolloutConfig
    from trgrpo.rollout import decode_compile

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", {"g++": "/usr/bin/g++"}.get)
    cfg = RolloutConfig()
    with caplog.at_level("INFO", logger="trgrpo"):
        assert decode_compile(cfg, "cpu") is True
    assert cfg.compile == "true"  # resolved into the run's config
    assert "rollout: decode step compiled (rollout.compile=auto: C++ compiler /usr/bin/g++)" in caplog.text
    monkeypatch.setattr("shutil.which", lambda name: None)
    cfg = RolloutConfig()
    assert decode_compile(cfg, "cpu") is False and cfg.compile == "false"
    monkeypatch.setenv("CXX", "my-cxx")  # $CXX is the one inductor would use, not g++
    monkeypatch.setattr("shutil.which", {"my-cxx": "/opt/my-cxx", "g++": "/usr/bin/g++"}.get)
    assert decode_compile(RolloutConfig(), "cpu") is True
    monkeypatch.setenv("CXX", "missing-cxx")
    assert decode_compile(RolloutConfig(), "cpu") is False
    assert decode_compile(RolloutConfig(), "cuda") is False  # not yet checked on a GPU
    assert decode_compile(RolloutConfig(engine="vllm"), "cpu") is False
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert decode_compile(RolloutConfig(compile="true"), "cpu") is True  # set: no detection
    assert decode_compile(RolloutConfig(compile="False"), "cpu") is False  # Hydra's bool, as a string


def test_rollout_compile_must_be_auto_true_or_false():
    (found,) = [p for p in problems(make_cfg("rollout.compile=sometimes")) if "rollout.compile" in p]
    assert found == "rollout.compile='sometimes' is not valid; choose one of: auto, true, false"
    assert not [p for p in problems(make_cfg("rollout.compile=true")) if "rollout.compile" in p]
