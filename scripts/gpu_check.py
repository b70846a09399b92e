"""The prepared GPU check (`scripts/gpu_check.sh`, `make gpu-check`): what no CPU run can show, in one go.

Sections, each timed; one that fails is recorded with its error and the others still run:

- `probe`:      the bf16 (and fp32) matmul rate of this device, measured here: MFU's denominator.
- `tests`:      `pytest -m gpu` in a fresh process (on CPU they are collected and skip).
- `generation`: the hf engine (rollout.hf_decode=auto, bf16) sampling n completions per prompt.
- `learner`:    `Learner.step` on fixed synthetic rollouts of mixed lengths, padded and padding-free
                (and padding-free on flash attention where flash-attn is installed): tokens/s, MFU.
- `train`:      `train.run` end to end (bf16, the tiny model's build path at ~150M parameters).
- `fsdp`:       the same run under torchrun (`trainer.distributed=true`, FSDP2; nccl on GPU) with
                one process per visible device.

The model is the embedded tiny model's recipe (`model.tiny.*`) at a larger size, built here with a
one-step warm start: nothing is downloaded. `--cpu` runs every section at tiny sizes on the CPU
(gloo), which is how CI keeps this script from rotting (tests/test_gpu_check.py). Results: a table
on stdout, and `gpu_check.json` and `gpu_check.md` (the table, for docs/BENCHMARKS.md) under --out.
What it does not do: decide anything from the numbers; they are for reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_bench as bench  # scripts/ is not a package: imported from its folder

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds for each subprocess (the tests, the torchrun run): a hang must not eat the budget
SIZES = {  # model.tiny.* of the built model; the train runs' overrides; the benches' sizes
    # ~154M parameters (12 layers × 12.8M), head_dim 64. Its tokenizer is trained on the warm start's
    # 16 examples: a vocabulary of ~330, so the lm_head is a negligible share of the work here.
    "gpu": {
        "model": "hidden_size=1024 layers=12 heads=16 intermediate_size=2816 "
        "max_position=2048 warmstart_steps=1 warmstart_batch=16",
        "train": "trainer.steps=3 trainer.prompts_per_step=32 rollout.group_size=8 "
        "rollout.max_new_tokens=256 task.eval_size=8",
        "probe": 8192,
        "learner": {"rows": 128, "prompt": (32, 128), "response": (32, 1024), "steps": 3},
        "generation": {"prompts": 32, "n": 8, "tokens": 256, "repeats": 2},
    },
    "cpu": {  # the dry run: every section, ~35 s on 2 cores
        "model": "hidden_size=64 layers=2 heads=2 intermediate_size=128 vocab_size=400 "
        "max_position=256 warmstart_steps=1 warmstart_batch=4",
        "train": "trainer.steps=2 trainer.prompts_per_step=2 rollout.group_size=2 "
        "rollout.max_new_tokens=8 task.eval_size=2 task.train_size=64 trainer.threads=1 "
        "trainer.verify_workers=0 trainer.device=cpu",
        "probe": 256,
        "learner": {"rows": 8, "prompt": (4, 12), "response": (4, 24), "steps": 2},
        "generation": {"prompts": 2, "n": 2, "tokens": 8, "repeats": 1},
    },
}
COMMON = "trainer.precision=bf16 trainer.eval_samples=1 eval.ks=[1] logger.console=false trainer.lr=1e-6 "
COMMON += "trainer.warmup_steps=0"


def overrides(mode: str) -> list[str]:
    """The config overrides of the train runs in this mode: model, sizes, bf16."""
    s = SIZES[mode]
    return [f"model.tiny.{kv}" for kv in s["model"].split()] + s["train"].split() + COMMON.split()


def compose(*over: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from trgrpo.config.schema import register, resolve

    register()
    with initialize_config_module("trgrpo.conf", version_base=None):
        return resolve(OmegaConf.to_object(hydra_compose("config", overrides=list(over))))


def run_tests(mode: str) -> dict:
    """`pytest -m gpu` over the test files that mark tests `gpu`, in a fresh process; the counts from
    its summary line. On a GPU machine at least one must pass; on CPU they are collected and skip."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-15:]), flush=True)
    summary = lines[-1] if lines else ""
    counts = {"files": len(files), "passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for count, key in re.findall(r"(\d+) (passed|failed|skipped|error)", summary):
        counts[key if key != "error" else "errors"] = int(count)
    wanted = counts["passed"] if mode == "gpu" else counts["passed"] + counts["skipped"]
    if done.returncode != 0 or counts["failed"] or counts["errors"] or not wanted:
        raise RuntimeError(f"pytest -m gpu: exit {done.returncode}: {summary}")
    return counts


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize_run(rows: list[dict]) -> dict:
    """Means over the steps after the first (warm-up: allocator, kernel choice), or the only one. A
    step's time is sampling + verifying, the update and the weight sync (the last step's evaluation
    and the logging are left out)."""
    timed = rows[1:] or rows

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    update, generate = mean("time/update"), mean("time/generate")
    response_tokens = mean("rollout/drawn") * mean("rollout/response_len")
    out = {
        "steps": len(rows),
        "time_generate_s": generate,
        "time_update_s": update,
        "time_sync_s": mean("time/sync"),
        "time_step_s": generate + update + mean("time/sync"),
        "tokens_per_s": mean("perf/tokens_per_s"),
        "sample_verify_tokens_per_s": response_tokens / max(generate, 1e-9),
        "learner_response_tokens_per_s": mean("train/tokens") / max(update, 1e-9),
        "loss_policy": rows[-1]["loss/policy"],
        "grad_norm": rows[-1]["train/grad_norm"],
    }
    if not all(math.isfinite(v) for v in out.values()):
        raise RuntimeError(f"non-finite numbers in the run's metrics: {out}")
    return out


def train_run(mode: str, work: Path) -> dict:
    from trgrpo.train import run

    run_dir = work / "train"
    run(compose(*overrides(mode)), run_dir)
    return summarize_run(metrics_rows(run_dir))


def fsdp_run(mode: str, work: Path) -> dict:
    """The train run under torchrun, one process per visible GPU (1 on CPU), FSDP2 on."""
    procs = max(1, torch.cuda.device_count()) if mode == "gpu" else 1
    spec = work / "fsdp.json"
    spec.write_text(json.dumps({"overrides": overrides(mode), "run_dir": str(work / "fsdp")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd += [str(Path(__file__).resolve()), "--fsdp-worker", str(spec)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exit {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads((work / "fsdp" / "worker.json").read_text())
    return {**result, **summarize_run(metrics_rows(work / "fsdp"))}


def fsdp_worker(spec_path: str) -> None:
    """One torchrun rank: join the group first (to record its backend), then train sharded."""
    from trgrpo.run import distributed
    from trgrpo.train import run

    spec = json.loads(Path(spec_path).read_text())
    cfg = compose(*spec["overrides"], "trainer.distributed=true")
    device = distributed.init(torch.device("cuda" if cfg.trainer.device != "cpu" else "cpu"))
    info = {"backend": torch.distributed.get_backend(), "world_size": distributed.world_size()}
    info["device"] = str(device)
    run_dir = Path(spec["run_dir"])
    run(cfg, run_dir)  # leaves (destroys) the group at its end
    if int(os.environ.get("RANK", "0")) == 0:
        (run_dir / "worker.json").write_text(json.dumps(info))


def environment(mode: str) -> dict:
    import transformers

    env = {"mode": mode, "torch": torch.__version__, "transformers": transformers.__version__}
    env["python"] = sys.version.split()[0]
    if mode == "gpu":
        env["device"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["device"] = "cpu"
    return env


def section(results: dict, name: str, fn) -> None:
    """Run one section; its result (or its error) goes into results[name], with its duration."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as err:
        traceback.print_exc()
        value = {"error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    value["seconds"] = round(time.perf_counter() - start, 2)
    results[name] = value
    print(f"   {name}: {value['seconds']:.1f}s{' FAILED' if 'error' in value else ''}", flush=True)


def check(mode: str, work: Path) -> dict:
    from trgrpo.run import host

    results: dict = {"environment": environment(mode), "overrides": overrides(mode)}
    sizes = SIZES[mode]
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    cfg = compose(*overrides(mode), "algo=grpo", "algo.kl_coef=0")
    host.configure(cfg.trainer, device)  # threads and freed-memory reuse, as `trgrpo train` sets them
    section(results, "probe", lambda: bench.matmul_rates(device, sizes["probe"]))
    section(results, "tests", lambda: run_tests(mode))
    peak = results["probe"].get("bf16_tflops", float("nan"))
    loaded: dict = {}

    def load() -> dict:
        loaded["model"], loaded["tokenizer"], info = bench.load_model(cfg, device)
        return info

    section(results, "model", load)
    if loaded:
        model, tokenizer = loaded.pop("model"), loaded.pop("tokenizer")
        g, lrn = sizes["generation"], sizes["learner"]
        section(results, "generation", lambda: bench.generation(model, tokenizer, **g))
        section(results, "learner", lambda: bench.learner(model, tokenizer, cfg, peak=peak, **lrn))
        del model
    bench.free_memory(device)
    section(results, "train", lambda: train_run(mode, work))
    bench.free_memory(device)
    section(results, "fsdp", lambda: fsdp_run(mode, work))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the dry run: tiny sizes on the CPU, gloo")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json and .md")
    parser.add_argument("--work", default=None, help="run folders and model cache (default: a temp dir)")
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker)
        return 0
    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; `--cpu` is the dry run", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TRGRPO_CACHE", str(work / "cache"))  # the model is built once, here
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        results = check(mode, work)
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    results["failed_sections"] = failed
    bench.report(results, Path(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
