"""Process-level settings of a run: torch threads, the learner's precision, keeping freed memory for reuse.

`configure` applies them once at the start of every command that computes (train, eval, build-tiny,
the bench) and writes what it resolved for `auto` back into the trainer config, so that the run
records (run.json, the log) what it ran with:

- `trainer.threads=auto`: the cores this process may use (its CPU affinity, capped by a cgroup CPU
  quota), split among the torchrun processes of the node. A number sets it; 0 keeps torch's default.
- `trainer.precision=auto`: on CUDA, bf16 where the GPU supports it; on CPU, bf16 only where a short
  matmul probe (~0.05 s) finds bf16 faster than fp32. An AMD EPYC with avx512_bf16 ran bf16 matmuls
  2-3.5x faster than fp32, an Intel Xeon with avx512_bf16 too at about half fp32's rate
  (docs/BENCHMARKS.md): the choice comes from the measurement, never from the CPU's name or flags.
- `trainer.fp32_matmul=auto`: torch's float32 matmul precision (`torch.set_float32_matmul_precision`)
  for the matmuls that stay float32 (the lm_head in the learner and the sampler, all of an fp32 run).
  Under "medium" torch may route them through oneDNN with bfloat16 inside; on an AMD EPYC (no AMX)
  oneDNN ran them as float32, 2-4x faster than MKL's kernels and with float32's rounding (a relative
  error ~1e-6 against float64, where bf16 inside gives ~4e-3). `auto` takes "medium" on CPU only where
  a probe at start finds both: at least `FP32_MARGIN` faster, and an error within `FP32_TOLERANCE`
  of the exact product; "highest" (torch's default) otherwise and on GPUs (TF32 there is ~1e-3). It
  runs before the bf16 probe, which then compares bf16 with the float32 rate in effect.

Freed memory: glibc hands large blocks back to the kernel when they are freed (mmap'd blocks above a
moving threshold; the heap top above twice that). Every learner step frees its activations and
allocates them again, so each new tensor is first-touch memory: on the ~10M bench model ~200k page
faults a step (~800 MB zeroed by the kernel), and a SwiGLU multiply into a fresh 23 MB tensor took
~40 ms instead of ~7. With the mmap threshold fixed at glibc's ceiling (32 MB) and trimming only above
1 GB of free heap, the faults after warm-up fall to ~0 (docs/BENCHMARKS.md). The cost: memory freed
in the process stays in it (peak RSS is unchanged). Tensors above 32 MB are still mmap'd.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trgrpo.config.schema import ConfigError, TrainerConfig
from trgrpo.config.validation import host_problems

log = logging.getLogger("trgrpo")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30


PROBE_SIZE = 512  # the probe multiplies two PROBE_SIZE × PROBE_SIZE matrices (0.27 GFLOP)
PROBE_REPEATS = 5  # timed matmuls per dtype after one warm-up; the fastest counts
BF16_MARGIN = 1.1  # bf16 must be this much faster: autocast adds casts, and at a tie fp32 is exact
FP32_MARGIN = 1.2  # "medium" float32 matmuls must be this much faster than "highest"
# max |medium - exact| / max |exact| of the probe's product: float32 rounding gives ~4e-7 at 512,
# TF32 ~5e-4, bf16 ~4e-3, bf16x3 ~1e-5
FP32_TOLERANCE = 4e-6


@dataclass(frozen=True)
class HostSettings:
    """What `configure` applied: resolved threads and precision, the probe's rates, the log line."""

    threads: int  # torch intra-op threads now in effect
    precision: str  # fp32 | bf16
    gflops: dict[str, float] | None  # the probe's matmul rates (fp32, bf16) when precision=auto measured them
    line: str
    fp32_matmul: str = "highest"  # torch's float32 matmul precision now in effect


def configure(trainer: TrainerConfig, device: torch.device | str = "cpu") -> HostSettings:
    """Apply trainer.threads, trainer.precision and trainer.reuse_host_memory to this process, once at
    start. `auto` values are resolved (the precision probe runs with the threads just set) and written
    back into `trainer`; invalid values raise ConfigError. Logs one line."""
    found = host_problems(trainer)
    if found:
        raise ConfigError("; ".join(found))
    device = torch.device(device)
    if trainer.threads == "auto":
        torch.set_num_threads(auto_threads())
        local = _local_processes()
        split = f" / {local} processes (torchrun, parallel sweep jobs)" if local > 1 else ""
        threads_from = f"auto: {usable_cores()} usable cores{split}"
    elif int(trainer.threads) > 0:
        torch.set_num_threads(int(trainer.threads))
        threads_from = "set"
    else:
        threads_from = "0: torch's default"
    trainer.threads = torch.get_num_threads()
    if trainer.fp32_matmul == "auto":
        trainer.fp32_matmul, why = auto_fp32_matmul(device)
        fp32_from = f"auto: {why}"
    else:
        fp32_from = "set"
    torch.set_float32_matmul_precision(trainer.fp32_matmul)
    gflops = None
    if trainer.precision == "auto":
        trainer.precision, gflops, why = auto_precision(device)
        precision_from = f"auto: {why}"
    else:
        precision_from = "set"
    if trainer.reuse_host_memory:
        reuse_freed_memory()
    line = (
        f"host: torch threads {trainer.threads} ({threads_from}), "
        f"precision {trainer.precision} ({precision_from}), "
        f"float32 matmuls {trainer.fp32_matmul} ({fp32_from})"
    )
    log.info(line)
    return HostSettings(trainer.threads, trainer.precision, gflops, line, trainer.fp32_matmul)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (else os.cpu_count), capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup's CFS quota allows (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us);
    None when there is no quota or it cannot be read."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _local_processes() -> int:
    """Training processes sharing this node's cores: torchrun's (LOCAL_WORLD_SIZE) times the jobs a
    parallel sweep runs at once (trgrpo/sweep.py sets TRGRPO_SWEEP_PARALLEL); 1 for a lone run."""
    count = 1
    for name in ("LOCAL_WORLD_SIZE", "TRGRPO_SWEEP_PARALLEL"):
        value = os.environ.get(name, "1")
        count *= max(1, int(value)) if value.isdigit() else 1
    return count


SWEEP_JOB_MEMORY = 3 * 2**30  # a tiny-model sweep job's peak (tool_qa's index: ~2 GB) and its verifiers


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this machine can give new processes (MemAvailable); None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sweep_jobs(per_job: int = SWEEP_JOB_MEMORY) -> int:
    """Jobs a CPU sweep runs at once (`hydra.launcher.n_jobs: ${trgrpo.sweep_jobs:}`): one per usable
    core, as many as the available memory holds at `per_job` bytes each."""
    jobs = usable_cores()
    memory = available_memory()
    if memory is not None:
        jobs = min(jobs, memory // per_job)
    return max(1, jobs)


def auto_threads() -> int:
    """trainer.threads=auto: the usable cores, shared among the training processes of this node."""
    return max(1, usable_cores() // _local_processes())


def matmul_rates(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """GFLOP/s of a size × size matmul on the CPU in fp32 and in bf16, with torch's current threads:
    the fastest of `repeats` after a warm-up (its own generator: the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    return {name: _mm_rate(a.to(dtype), b.to(dtype), repeats) for name, dtype in dtypes}


def _mm_rate(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """GFLOP/s of a @ b (square): the fastest of `repeats` after a warm-up (kernel choice, thread pool,
    buffers)."""
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * a.shape[0] ** 3 / max(best, 1e-9) / 1e9


def fp32_matmul_probe(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """A size × size float32 matmul on the CPU under torch's "highest" and "medium" precision: each one's
    GFLOP/s (fastest of `repeats` after a warm-up) and medium's error, max |medium − exact| / max |exact|
    against float64. Torch's precision is left as it was."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    saved = torch.get_float32_matmul_precision()
    out: dict[str, float] = {}
    try:
        for name in ("highest", "medium"):
            torch.set_float32_matmul_precision(name)
            out[name] = _mm_rate(a, b, repeats)
        product = torch.mm(a, b)  # under medium
    finally:
        torch.set_float32_matmul_precision(saved)
    exact = torch.mm(a.double(), b.double())
    out["error"] = float((product.double() - exact).abs().max() / exact.abs().max())
    return out


def auto_fp32_matmul(device: torch.device) -> tuple[str, str]:
    """trainer.fp32_matmul=auto on `device`: (highest | medium, why)."""
    if device.type != "cpu":
        return "highest", f"float32 on {device.type}"
    probe = fp32_matmul_probe()
    speed, error = probe["medium"] / probe["highest"], probe["error"]
    choice = "medium" if speed >= FP32_MARGIN and error <= FP32_TOLERANCE else "highest"
    why = f"{PROBE_SIZE}x{PROBE_SIZE} medium {speed:.2f}x highest's rate, relative error {error:.1e}"
    return choice, why


def auto_precision(device: torch.device) -> tuple[str, dict[str, float] | None, str]:
    """trainer.precision=auto on `device`: (fp32 | bf16, the probe's GFLOP/s or None, why)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", None, "the GPU supports bf16"
        return "fp32", None, "the GPU lacks bf16"
    if device.type != "cpu":
        return "fp32", None, f"no bf16 probe on {device.type}"
    rates = matmul_rates()  # fp32 at the float32 matmul precision now in effect
    choice = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
    size = f"{PROBE_SIZE}x{PROBE_SIZE}"
    why = f"{size} matmul fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s"
    return choice, rates, why


def reuse_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks up to 32 MB for reuse; False where it is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
