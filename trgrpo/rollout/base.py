"""The engine protocol: the only thing the loop knows about how completions are sampled."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import Tensor

from trgrpo.run.records import Completion, Sampling


class Engine(Protocol):
    """Samples completions from token-id prompts and follows the learner's weights."""

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        """Return `sampling.n` completions per prompt, prompt-major: result[i * n + j]."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Make the next `generate` sample from these weights (a no-op when sharing the model)."""
        ...

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the learner runs (a no-op where there is none to
        free); the next `generate` or `load_weights` wakes it."""
        ...

    def close(self) -> None:
        """Release the engine for good (the run is over); another engine may start after it."""
        ...
