"""The `hf` engine: batched sampling with `transformers` generate on the learner's own model.

It shares the policy module with the learner in one process, so `load_weights` has nothing to copy;
under torchrun the learner's policy is sharded and the engine samples from an unsharded copy, into
which `load_weights` copies the gathered parameters after every optimizer step. Sampler log-probs
are log-softmax(raw logits / temperature) over the full vocabulary at the sampled ids, the same
quantity the learner computes (ALGORITHMS.md, "Log-probs"); top-p only changes which ids are drawn.
Sampling uses a forked RNG seeded per call, so generation never moves the learner's RNG and a run is
reproducible from its seed.

Two decoders (`rollout.hf_decode`): `shared_prefix` (prefix_decode.py; `auto` picks it where the
architecture supports it) prefills each prompt once and keeps its keys and values once for its n
samples, with cascade attention at every new token; it computes each token's log-prob as it samples
(no [rows, tokens, vocab] logits are kept). `generate` is transformers' own loop, for any model: each
prompt is prefilled once and its KV cache repeated n times into a static cache (`generate`'s
num_return_sequences would run the prefill n times).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from trgrpo.config.schema import ConfigError
from trgrpo.models.body import with_cache
from trgrpo.rollout import prefix_decode
from trgrpo.run.records import Completion, Sampling


class HFEngine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 0,
        decode: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
    ):
        self.model = model
        # bf16: the model body runs under autocast, as the learner's does (weights cast once per call:
        # autocast caches the casts of parameters within one context); the head stays float32.
        self.precision = precision
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # prompts per generate call; 0 = all at once
        self.eos_ids = _eos_ids(model, tokenizer)
        supported = prefix_decode.supports(model)
        if decode == "shared_prefix" and not supported:
            raise ConfigError(
                f"rollout.hf_decode=shared_prefix does not support this model (model_type "
                f"{getattr(model.config, 'model_type', None)!r}; supported: full-attention "
                f"{', '.join(prefix_decode.SUPPORTED_MODEL_TYPES)}): use rollout.hf_decode=auto or generate"
            )
        self.shared_prefix = decode == "shared_prefix" or (decode == "auto" and supported)
        self.compile = compile  # rollout.compile: the shared-prefix decode step through torch.compile

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the learner's parameters in; those that are this module's own (one process: the engine
        samples from the learner's module itself) are skipped. Consumes the whole iterable."""
        own = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if own[name] is not tensor:
                own[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the engine holds no memory of its own besides the learner's module."""

    def close(self) -> None:
        """Nothing to release (see `sleep`)."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        step = self.batch_size or len(prompts) or 1
        out: list[Completion] = []
        for start in range(0, len(prompts), step):
            seed = None if sampling.seed is None else sampling.seed + start
            out += self._generate_batch(prompts[start : start + step], sampling, seed)
        return out

    def _generate_batch(
        self, prompts: list[list[int]], sampling: Sampling, seed: int | None
    ) -> list[Completion]:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same position
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                decode = self._shared_prefix if self.shared_prefix else self._generate
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    new_ids, logprobs = decode(input_ids, attention, sampling)
        finally:
            self.model.train(was_training)
        new_ids, logprobs = new_ids.cpu(), logprobs.cpu()
        return [
            self._completion(new_ids[i].tolist(), logprobs[i].tolist(), sampling) for i in range(len(new_ids))
        ]

    def _shared_prefix(
        self, input_ids: Tensor, attention: Tensor, sampling: Sampling
    ) -> tuple[Tensor, Tensor]:
        return prefix_decode.sample(
            self.model,
            input_ids,
            attention,
            n=sampling.n,
            max_new_tokens=sampling.max_new_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_token_id,
            stop_check=self._stop_check(sampling.stop) if sampling.stop else None,
            compile=self.compile,
        )

    def _stop_check(self, stops: tuple[str, ...]):
        """Which live rows' text now contains a stop string: decodes each live row's last few tokens
        (a stop string of c characters spans at most c tokens, plus slack for tokens of no text)."""
        window = max(len(s) for s in stops) + 4

        def check(ids: Tensor, live: Tensor) -> Tensor:
            rows = live.nonzero().flatten().tolist()
            texts = self.tokenizer.batch_decode(ids[rows, -window:].tolist(), skip_special_tokens=False)
            hit = torch.zeros_like(live)
            hit[rows] = torch.tensor([any(s in text for s in stops) for text in texts], device=live.device)
            return hit

        return check

    def _generate(self, input_ids: Tensor, attention: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
        width, pad = input_ids.shape[1], self.tokenizer.pad_token_id
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            pad_token_id=pad,
            eos_token_id=self.eos_ids,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.n > 1 and width > 1:
            prefix = self._prefill(input_ids, attention, sampling.n, max_len=width + sampling.max_new_tokens)
            kwargs.update(with_cache(self.model, prefix))
        input_ids = input_ids.repeat_interleave(sampling.n, dim=0)
        attention = attention.repeat_interleave(sampling.n, dim=0)
        result = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_ids = result.sequences[:, width:].cpu()
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logits = torch.stack(result.logits, dim=1).float().cpu()  # [B, T, V], in host memory
        logprobs = (
            torch.log_softmax(logits / temperature, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
        )
        return new_ids, logprobs

    def _prefill(self, input_ids: Tensor, attention: Tensor, n: int, max_len: int):
        """The KV cache of every prompt but its last token, computed once and repeated n times per row.

        `generate` sees a cache shorter than its input by one token, so it runs only that token through
        the model before sampling; the distribution is the same as prefilling each of the n copies.
        The repeated cache is a static one of `max_len` positions where this transformers has one:
        decoding then writes in place instead of concatenating the whole cache at every token
        (~20% faster sampling on CPU, docs/BENCHMARKS.md); same samples either way (tested).
        """
        cache = prefix_decode.prompt_cache(self.model, input_ids, attention)
        static = _static_copy(cache, self.model.config, n, max_len)
        if static is not None:
            return static
        cache.batch_repeat_interleave(n)
        return cache

    def _completion(self, ids: list[int], logprobs: list[float], sampling: Sampling) -> Completion:
        end, reason = len(ids), "length"
        for k, token in enumerate(ids):
            if token in self.eos_ids:
                end, reason = k + 1, "stop"
                break
        if sampling.stop:
            stop_end = _stop_string_end(self.tokenizer, ids[:end], sampling.stop)
            if stop_end is not None:
                end, reason = stop_end, "stop"
        ids, logprobs = ids[:end], logprobs[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(tuple(ids), tuple(logprobs), (True,) * len(ids), text, reason)


def _static_copy(cache, config, n: int, max_len: int):
    """A StaticCache of `max_len` positions holding `cache`'s rows each repeated n times, or None where
    this transformers or this model's layers do not allow one (the dynamic cache is used then)."""
    try:
        from transformers import StaticCache

        layers = cache.layers
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None  # sliding-window or other special layers: keep their own cache type
        static = StaticCache(config=config, max_cache_len=max_len)
        for i, layer in enumerate(layers):
            length = layer.keys.shape[-2]
            static.update(
                layer.keys.repeat_interleave(n, dim=0),
                layer.values.repeat_interleave(n, dim=0),
                i,
                {"cache_position": torch.arange(length, device=layer.keys.device)},
            )
        return static
    except (ImportError, AttributeError, TypeError):
        return None


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _stop_string_end(tokenizer, ids: list[int], stops: tuple[str, ...]) -> int | None:
    """The number of tokens up to and including the one that completes the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [text.find(s) + len(s) for s in stops if s in text]
    if not hits:
        return None
    target = min(hits)
    lo, hi = 1, len(ids)  # smallest k with len(decode(ids[:k])) >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo
