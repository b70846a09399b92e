"""Test-only tasks for the verifier pool: importable by name, so spawned workers can build them."""

from __future__ import annotations

import os
import time

from trgrpo.run.records import Example, Reward


class MisbehavingTask:
    """verify: "ok" → 1, "sleep" → hangs, "crash" → raises, "die" → kills its worker process."""

    name = "misbehaving"
    tools: dict = {}  # noqa: RUF012
    stop = ()

    def __init__(self, cfg=None):
        self.cfg = cfg

    def dataset(self, split, size, seed):
        return [Example(f"{split}-{i}", "say ok", "ok") for i in range(size)]

    def verify(self, example: Example, response: str) -> Reward:
        if response == "sleep":
            time.sleep(60)
        if response == "crash":
            raise RuntimeError("verifier bug")
        if response == "die":
            os._exit(1)
        return Reward(float(response == "ok"), {"correct": float(response == "ok")})

    def demonstration(self, example):
        return [("ok", True)]
