"""Rollout throughput: the `hf` engine's two decoders and the `vllm` engine, side by side in one process.

`hf` is the default shared-prefix decoder (rollout.hf_decode=auto), `hf-generate` is transformers'
generate from a repeated static cache (rollout.hf_decode=generate). All engines sample the same prompts (math task, chat template) with the same `Sampling` (n samples
per prompt, temperature 1, max_new_tokens) from the same policy, on the tiny model's architecture and
on a ~10M-parameter Llama with the same tokenizer. The weights are freshly initialised (no warm
start): throughput does not depend on them, and most completions run to max_new_tokens (tokens/s
counts the tokens each engine returned). Calls alternate between the engines (after one
warm-up call each) and the report gives medians. Also timed: engine start and one weight push
(`load_weights`, what the train loop does after every optimizer step).

    .venv-vllm/bin/python scripts/bench_rollout.py --threads 1   # vllm: make install-vllm
    .venv/bin/python scripts/bench_rollout.py --threads 1 --engines hf hf-generate
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trgrpo.config.schema import RolloutConfig, TinyConfig
from trgrpo.run.records import Sampling

ENGINES = ("hf", "hf-generate", "vllm")
MODELS = {
    "tiny": TinyConfig(),  # hidden 128, 4 layers: the embedded model's architecture
    "llama-10m": TinyConfig(hidden_size=256, layers=8, heads=8, intermediate_size=1024),
}


def make_prompts(count: int):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from trgrpo.config.schema import register
    from trgrpo.models.chat import encode_prompt
    from trgrpo.models.tiny import _train_tokenizer
    from trgrpo.tasks import make_task

    register()
    with initialize_config_module("trgrpo.conf", version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=["task.train_size=2000"]))
    task = make_task(cfg.task)
    examples = task.dataset("train", 2000, seed=0)
    tokenizer = _train_tokenizer(task, examples, TinyConfig().vocab_size)
    return tokenizer, [encode_prompt(tokenizer, ex.prompt) for ex in examples[:count]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(
    name: str, tokenizer, prompts, sampling: Sampling, repeats: int, names: list[str], precision: str = "fp32"
) -> list[dict]:
    from trgrpo.models.tiny import _init_model
    from trgrpo.rollout.hf_engine import HFEngine

    model = _init_model(tokenizer, MODELS[name], seed=0).eval()
    params = sum(p.numel() for p in model.parameters())
    engines, start_s = {}, {}
    for key in names:
        start = time.perf_counter()
        if key == "vllm":
            from trgrpo.rollout.vllm_engine import VLLMEngine

            engines[key] = VLLMEngine(model, tokenizer, RolloutConfig(engine="vllm"), seed=0)
        else:
            decode = "generate" if key == "hf-generate" else "auto"
            engines[key] = HFEngine(model, tokenizer, decode=decode, precision=precision)
        start_s[key] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {k: [] for k in engines}
    for engine in engines.values():
        engine.generate(prompts, sampling)  # warm-up
    for r in range(repeats):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]  # alternate who goes first
        for key in order:
            t0 = time.perf_counter()
            out = engines[key].generate(prompts, sampling)
            seconds[key].append(time.perf_counter() - t0)
            tokens[key].append(sum(len(c.token_ids) for c in out))
    sync = (
        [timed(lambda: engines["vllm"].load_weights(model.named_parameters())) for _ in range(3)]
        if "vllm" in engines
        else []
    )
    rows = []
    for key in engines:
        s = statistics.median(seconds[key])
        rows.append(
            {
                "model": name,
                "params_m": params / 1e6,
                "engine": key,
                "tokens_per_call": statistics.median(tokens[key]),
                "seconds": s,
                "tokens_per_s": statistics.median(t / x for t, x in zip(tokens[key], seconds[key])),
                "start_s": start_s[key],
                "sync_s": statistics.median(sync) if key == "vllm" else 0.0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="the hf engines' (trainer.precision)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, prompts = make_prompts(args.prompts)
    sampling = Sampling(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.n, seed=0)
    rows = []
    for name in args.models:
        rows += bench_model(name, tokenizer, prompts, sampling, args.repeats, args.engines, args.precision)
    print(
        f"\n{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
        f"{torch.get_num_threads()} torch threads, hf in {args.precision}, median of {args.repeats} calls\n"
    )
    base = args.engines[0]
    print(f"| model | params | engine | tokens/call | s/call | tokens/s | vs {base} | start s | sync s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        hf = next(r for r in rows if r["model"] == row["model"] and r["engine"] == base)
        print(
            f"| {row['model']} | {row['params_m']:.1f}M | {row['engine']} | {row['tokens_per_call']:.0f} "
            f"| {row['seconds']:.2f} | {row['tokens_per_s']:.0f} "
            f"| {row['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {row['start_s']:.1f} | {row['sync_s']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
