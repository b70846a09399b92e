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


def broken_in_workers(cfg):
    """A task factory that works in the training process and raises in every verifier worker (as an
    import missing from the workers' environment would)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        raise ImportError("no module named 'verifier_backend'")
    from trgrpo.tasks import make_task

    return MisbehavingTask(cfg) if cfg.name == "misbehaving" else make_task(cfg)


def dies_in_workers(cfg):
    """A task factory whose workers die before they run anything."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        os._exit(3)
    return MisbehavingTask(cfg)


def hangs_in_workers(cfg):
    """A task factory whose workers never finish starting."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        time.sleep(3600)
    return MisbehavingTask(cfg)
