"""Host memory reuse (trgrpo/run/host.py): after `reuse_freed_memory`, reallocating what a step freed
costs far fewer page faults; by default glibc hands much of it back and the kernel zeroes it again
(the learner's real pattern goes from ~200k faults a step to ~0: docs/BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from trgrpo.run.host import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
faults = []
for _ in range(4):  # a step's pattern: ten 20 MB activations allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(5 << 20) for _ in range(10)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def _faults_after_first_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_memory_is_reused_without_page_faults():
    plain, reused = _faults_after_first_step("plain"), _faults_after_first_step("reuse")
    pages = 3 * 10 * (20 << 20) // 4096  # what three more steps would fault in from scratch
    assert plain > 0.3 * pages  # glibc's default gives a good part of it back every step
    assert reused < 0.5 * plain
