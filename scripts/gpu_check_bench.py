"""The measurements of `scripts/gpu_check.py` that run in its own process, and its report.

Timings synchronise the device before reading the clock. MFU is model FLOPs per second (each real
token's forward and backward through the decoder layers, causal attention counted at half of the
n² pairs, the lm_head on response tokens; padding and recomputation are not credited) over the bf16
matmul rate measured in the same process, not a datasheet number.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_rates(device: torch.device, size: int, repeats: int = 10) -> dict:
    """TFLOP/s of a size × size × size matmul in bf16 and fp32 on `device` (mean of `repeats` after
    three warm-ups, random data; trgrpo/run/host.py's CPU probe, sized for a GPU)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"size": size}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, generator=gen, device=device).to(dtype)
        b = torch.randn(size, size, generator=gen, device=device).to(dtype)
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync(device)
        out[f"{name}_tflops"] = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
        del a, b
    return out


def load_model(cfg, device: torch.device):
    """The check's policy (built into the cache on first use, as `trgrpo train` builds it)."""
    from trgrpo.models.load import load_policy

    model, tokenizer = load_policy(cfg.model, cfg.task, seed=cfg.seed, device=str(device))
    c = model.config
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "vocab": c.vocab_size,
        "attn_implementation": str(c._attn_implementation),
    }
    return model, tokenizer, info


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = random.Random(seed)
    return [[gen.randrange(8, vocab) for _ in range(length)] for _ in range(count)]  # past the specials


def generation(model, tokenizer, *, prompts: int, n: int, tokens: int, repeats: int) -> dict:
    """The hf engine (bf16, as in training) sampling `n` completions of `tokens` new tokens for each
    of `prompts` prompts of 48 tokens; tokens/s counts the tokens returned (EOS can end one early)."""
    from trgrpo.rollout.hf_engine import HFEngine
    from trgrpo.run.records import Sampling

    device = next(model.parameters()).device
    engine = HFEngine(model, tokenizer, precision="bf16")
    ids = random_prompts(prompts, 48, model.config.vocab_size, seed=0)
    engine.generate(ids, Sampling(max_new_tokens=min(8, tokens), n=n, seed=0))  # warm-up
    times, counts = [], []
    for r in range(repeats):
        sync(device)
        start = time.perf_counter()
        done = engine.generate(ids, Sampling(max_new_tokens=tokens, n=n, seed=1 + r))
        sync(device)
        times.append(time.perf_counter() - start)
        counts.append(sum(len(c.token_ids) for c in done))
    rates = [c / t for c, t in zip(counts, times)]
    return {
        "decode": "shared_prefix" if engine.shared_prefix else "generate",
        "rows": prompts * n,
        "tokens_per_call": statistics.median(counts),
        "call_s": statistics.median(times),
        "tokens_per_s": statistics.median(rates),
    }


def synthetic_rollouts(rows: int, prompt: tuple[int, int], response: tuple[int, int], vocab: int):
    """`rows` rollouts with distinct random prompts and responses, lengths uniform in the ranges."""
    from trgrpo.run.records import Completion, Example, Reward, Rollout

    gen = random.Random(0)
    out = []
    for i in range(rows):
        p, t = gen.randint(*prompt), gen.randint(*response)
        ids = tuple(gen.randrange(8, vocab) for _ in range(t))
        completion = Completion(ids, (0.0,) * t, (True,) * t, "", "length")
        prompt_ids = tuple(gen.randrange(8, vocab) for _ in range(p))
        out.append(Rollout(Example(str(i), "", "0"), prompt_ids, completion, Reward(0.0)))
    return out, torch.randn(rows, generator=torch.Generator().manual_seed(0))


def learner_flops(config, rollouts) -> float:
    """Model FLOPs of one update (forward + backward) over the rollouts' real tokens (module doc)."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = d * (2 * q + 2 * kv) + 3 * d * config.intermediate_size  # q, o, k, v; gate, up, down
    total = 0.0
    for r in rollouts:
        n, t = len(r.prompt_ids) + len(r.completion.token_ids), sum(r.completion.response_mask)
        # attention: QKᵀ and AV over the n²/2 causal pairs, 2·n²·q FLOPs forward, ×3 with backward
        total += 6 * n * layers * layer + 6 * layers * q * n * n + 6 * vocab * d * t
    return total


def learner(model, tokenizer, cfg, *, peak: float, rows: int, prompt, response, steps: int) -> dict:
    """`Learner.step` (bf16, no KL, one optimizer step) on the same synthetic rollouts, padded and
    padding-free; the median of `steps` steps after one warm-up step."""
    from trgrpo.learner.learner import Learner

    device = next(model.parameters()).device
    rollouts, advantages = synthetic_rollouts(rows, prompt, response, model.config.vocab_size)
    flops = learner_flops(model.config, rollouts)
    tokens = sum(len(r.prompt_ids) + len(r.completion.token_ids) for r in rollouts)
    out = {"rows": rows, "tokens_per_step": tokens, "model_tflop_per_step": flops / 1e12}
    variants = {"padded": ("false", None), "padding_free": ("true", None)}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        variants["padding_free_flash"] = ("true", "flash_attention_2")
    else:
        out["flash_attn"] = "not installed: padding-free runs SDPA with a block-diagonal mask"
    for name, (mode, attn) in variants.items():
        if attn is not None:
            model.set_attn_implementation(attn)
        trainer = dataclasses.replace(cfg.trainer, padding_free=mode)
        lrn = Learner(
            model,
            None,
            trainer=trainer,
            algo=cfg.algo,
            temperature=1.0,
            max_new_tokens=response[1],
            pad_id=tokenizer.pad_token_id,
        )
        assert lrn.padding_free == (mode == "true"), (name, lrn.padding_free)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps + 1):
            sync(device)
            start = time.perf_counter()
            metrics = lrn.step(rollouts, advantages, group_size=1)
            sync(device)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[1:])
        out[name] = {
            "attn_implementation": str(model.config._attn_implementation),
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "mfu": flops / step_s / (peak * 1e12),
            "loss_policy": metrics["loss/policy"],
            "grad_norm": metrics["train/grad_norm"],
        }
        if device.type == "cuda":
            out[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        del lrn
        free_memory(device)
    out["padding_free_speedup"] = out["padded"]["step_s"] / out["padding_free"]["step_s"]
    return out


def table(results: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the report; a failed section shows its error."""

    def fmt(value, spec=".1f") -> str:
        return format(value, spec) if isinstance(value, (int, float)) else str(value)

    env, rows = results["environment"], []
    rows.append(("device", f"{env['device']} (torch {env['torch']}, transformers {env['transformers']})"))
    for name in ("probe", "tests", "model", "generation", "learner", "train", "fsdp"):
        r = results.get(name, {"error": "not run"})
        if "error" in r:
            rows.append((name, f"FAILED: {r['error'].splitlines()[0][:120]}"))
            continue
        if name == "probe":
            rates = f"{r['bf16_tflops']:.4g} / {r['fp32_tflops']:.4g}"
            rows.append((f"matmul bf16 / fp32 TFLOP/s ({r['size']}^3)", rates))
        elif name == "tests":
            rows.append(
                ("pytest -m gpu", f"{r['passed']} passed, {r['skipped']} skipped, {r['failed']} failed")
            )
        elif name == "model":
            rows.append(
                ("model", f"{r['params'] / 1e6:.1f}M params, {r['layers']} layers, vocab {r['vocab']}")
            )
        elif name == "generation":
            rows.append((f"generation tokens/s ({r['rows']} rows)", fmt(r["tokens_per_s"], ".0f")))
        elif name == "learner":
            for key in ("padded", "padding_free", "padding_free_flash"):
                if key in r:
                    v = r[key]
                    label = f"learner {key} ({v['attn_implementation']}) tokens/s, MFU"
                    rows.append((label, f"{v['tokens_per_s']:.0f}, {100 * v['mfu']:.1f}%"))
            rows.append(("padding-free / padded speed", f"{r['padding_free_speedup']:.2f}x"))
        else:
            prefix = f"fsdp ({r['backend']}, {r['world_size']} rank)" if name == "fsdp" else "train"
            rows.append((f"{prefix} step s (generate, update)", fmt_run(r)))
            rows.append(
                (f"{prefix} learner response tokens/s", fmt(r["learner_response_tokens_per_s"], ".0f"))
            )
    rows.append(("total", f"{results['seconds_total']:.0f} s"))
    return rows


def fmt_run(r: dict) -> str:
    return f"{r['time_step_s']:.2f} ({r['time_generate_s']:.2f}, {r['time_update_s']:.2f})"


def report(results: dict, out: Path) -> None:
    """Print the table; write gpu_check.json (every number) and gpu_check.md (the table) to `out`."""
    rows = table(results)
    width = max(len(label) for label, _ in rows)
    print("\n" + "\n".join(f"{label:<{width}}  {value}" for label, value in rows), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    md = ["| measurement | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print(f"\nwritten: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}", flush=True)
