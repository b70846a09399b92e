"""Process-level settings for work on the host CPU: torch threads, and keeping freed memory for reuse.

glibc hands large blocks back to the kernel when they are freed (mmap'd blocks above a moving
threshold; the heap top above twice that). Every learner step frees its activations and allocates
them again, so each new tensor is first-touch memory: on the ~10M bench model ~200k page faults a
step (~800 MB zeroed by the kernel), and a SwiGLU multiply into a fresh 23 MB tensor took ~40 ms
instead of ~7. With the mmap threshold fixed at glibc's ceiling (32 MB) and trimming only above
1 GB of free heap, the faults after warm-up fall to ~0 (docs/BENCHMARKS.md). The cost: memory freed
in the process stays in it (peak RSS is unchanged). Tensors above 32 MB are still mmap'd.
"""

from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30


def configure(threads: int, reuse_memory: bool) -> None:
    """trainer.threads (> 0 sets torch's intra-op threads) and trainer.reuse_host_memory."""
    if threads > 0:
        torch.set_num_threads(threads)
    if reuse_memory:
        reuse_freed_memory()


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
