"""The order in which training prompts are drawn: a reshuffle of the training set each pass, seeded, with
a position that checkpoints save and restore (so a resumed run draws what an uninterrupted one would)."""

from __future__ import annotations

import random


class PromptSampler:
    """Walks the training set in a reshuffled order each pass; its position is checkpointed."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0
        self.order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._shuffled()
            out.append(self.order[self.position])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.order = self._shuffled()
