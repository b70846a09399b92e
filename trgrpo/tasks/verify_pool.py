"""Verification in worker processes with a hard per-sample timeout.

math-verify can hang on pathological LaTeX and uses `signal.alarm`, which works only in a process's
main thread; a buggy verifier can crash. So `VerifyPool` runs `task.verify` in pebble worker
processes: a sample that times out or whose worker dies scores 0 with `unscorable=True`, pebble
replaces the worker, and the run goes on. `workers=0` verifies in this process (no timeout), which
tests and debugging use.

Workers that cannot start must not score a step 0 for nothing. When a worker dies while no sample
runs on it (at start, or killed while idle), pebble fails every queued sample with
`BrokenProcessPool` and the pool is dead: `score` starts a new pool and scores the samples again, and
raises `VerifierStartError` if that one breaks too. A worker whose task fails to build reports the
error with every sample it is given (raised in the initializer, pebble would end the worker and break
the pool without saying why), and until some sample has come back the pool waits at most
`START_LIMIT` (or twice the per-sample timeout) for a worker that never gets going; both raise
`VerifierStartError`.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from trgrpo.config.schema import TaskConfig
from trgrpo.run.records import Example, Reward
from trgrpo.tasks import Task, make_task

UNSCORABLE = Reward(0.0, {}, unscorable=True)
START_LIMIT = 120.0  # seconds the first samples may wait for a worker to start (spawn, imports, task)
_worker_task: Task | None = None
_worker_error: str | None = None  # why this worker could not build its task


class VerifierStartError(RuntimeError):
    """The verifier workers cannot start: every sample would wait forever or score 0 for nothing."""


def _init_worker(factory: Callable[[TaskConfig], Task], cfg: TaskConfig) -> None:
    global _worker_task, _worker_error
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when to stop (and
    # stops the pool); a worker killed by it would score a sample of the step being finished as 0.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_task = factory(cfg)
    except Exception as error:  # raised here, pebble would restart the worker over and over
        _worker_error = f"{type(error).__name__}: {error}"


def _verify(example: Example, response: str) -> Reward:
    if _worker_error is not None:
        raise VerifierStartError(f"the verifier worker could not build the task ({_worker_error})")
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
        self.workers, self.factory, self.cfg = workers, factory, cfg
        self.pool = None
        self.started = False  # some sample has come back from a worker
        if workers > 0:
            self._start()

    def _start(self) -> None:
        import pebble

        # spawn: the parent holds torch threads, which fork would copy in an undefined state.
        self.pool = pebble.ProcessPool(
            max_workers=self.workers,
            initializer=_init_worker,
            initargs=(self.factory, self.cfg),
            context=multiprocessing.get_context("spawn"),
        )

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[Reward]:
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        if self.pool is None:
            return [self._inline(ex, text) for ex, text in zip(examples, responses)]
        try:
            return self._score(examples, responses)
        except BrokenProcessPool:
            # A worker died while no sample ran on it (killed while idle, or at start): pebble then
            # fails every queued sample and refuses new ones. Start a new pool and score once more.
            self.close()
            self._start()
            self.started = False
            try:
                return self._score(examples, responses)
            except BrokenProcessPool:
                self.close()
                raise VerifierStartError(
                    "the verifier workers die before they run a sample (twice); "
                    "trainer.verify_workers=0 verifies in the training process"
                ) from None

    def _score(self, examples: Sequence[Example], responses: Sequence[str]) -> list[Reward]:
        try:
            futures = [
                self.pool.schedule(_verify, args=(ex, text), timeout=self.timeout)
                for ex, text in zip(examples, responses)
            ]
        except RuntimeError:  # "Unexpected error within the Pool": it broke before this call
            if self.pool.active:
                raise
            raise BrokenProcessPool("the verifier pool broke between two calls") from None
        if futures and not self.started:
            limit = max(START_LIMIT, 2 * self.timeout)
            if not wait(futures, timeout=limit, return_when=FIRST_COMPLETED).done:
                self.close()
                raise VerifierStartError(
                    f"no verifier worker started within {limit:.0f} s; "
                    "trainer.verify_workers=0 verifies in the training process"
                )
        rewards = [self._result(future) for future in futures]
        self.started = True
        return rewards

    def _inline(self, example: Example, response: str) -> Reward:
        try:
            return self.task.verify(example, response)
        except Exception:
            return UNSCORABLE

    def _result(self, future) -> Reward:
        try:
            reward = future.result()
        except VerifierStartError as error:
            self.close()
            raise VerifierStartError(
                f"{error}; trainer.verify_workers=0 verifies in the training process"
            ) from None
        except BrokenProcessPool:
            raise
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
