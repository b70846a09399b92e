"""Verification in worker processes with a hard per-sample timeout.

math-verify can hang on pathological LaTeX and uses `signal.alarm`, which works only in a process's
main thread; a buggy verifier can crash. So `VerifyPool` runs `task.verify` in pebble worker
processes: a sample that times out or whose worker dies scores 0 with `unscorable=True`, pebble
replaces the worker, and the run goes on. `workers=0` verifies in this process (no timeout), which
tests and debugging use.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from trgrpo.config.schema import TaskConfig
from trgrpo.run.records import Example, Reward
from trgrpo.tasks import Task, make_task

UNSCORABLE = Reward(0.0, {}, unscorable=True)
_worker_task: Task | None = None


def _init_worker(factory: Callable[[TaskConfig], Task], cfg: TaskConfig) -> None:
    global _worker_task
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when to stop (and
    # stops the pool); a worker killed by it would score a sample of the step being finished as 0.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_task = factory(cfg)


def _verify(example: Example, response: str) -> Reward:
    assert _worker_task is not None, "verifier worker used before its initializer ran"
    return _worker_task.verify(example, response)


class VerifyPool:
    """Owns the worker processes; `score` returns one Reward per (example, response) pair, in order."""

    def __init__(
        self,
        cfg: TaskConfig,
        *,
        workers: int,
        timeout: float,
        task: Task | None = None,
        factory: Callable[[TaskConfig], Task] = make_task,
    ):
        """`factory(cfg)` builds the task in each worker: it must be importable (picklable by name)."""
        self.timeout = timeout
        self.task = task if task is not None else factory(cfg)
        self.pool = None
        if workers > 0:
            import pebble

            # spawn: the parent holds torch threads, which fork would copy in an undefined state.
            self.pool = pebble.ProcessPool(
                max_workers=workers,
                initializer=_init_worker,
                initargs=(factory, cfg),
                context=multiprocessing.get_context("spawn"),
            )

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[Reward]:
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        if self.pool is None:
            return [self._inline(ex, text) for ex, text in zip(examples, responses)]
        futures = [
            self.pool.schedule(_verify, args=(ex, text), timeout=self.timeout)
            for ex, text in zip(examples, responses)
        ]
        return [self._result(future) for future in futures]

    def _inline(self, example: Example, response: str) -> Reward:
        try:
            return self.task.verify(example, response)
        except Exception:
            return UNSCORABLE

    @staticmethod
    def _result(future) -> Reward:
        try:
            reward = future.result()
        except (FutureTimeout, Exception):  # timeout, a crashed or killed worker, a verifier bug
            return UNSCORABLE
        return reward if isinstance(reward, Reward) else UNSCORABLE

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> VerifyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
