"""The tiny model's cache key: what the build depends on changes it, RL-only settings do not; the
warm-start length comes from the task unless model.tiny.warmstart_steps is set."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import make_cfg

from trgrpo.models.tiny import tiny_key, tiny_seed, warmstart_size


def key(*overrides: str) -> str:
    cfg = make_cfg(*overrides)
    return tiny_key(cfg.model.tiny, cfg.task, cfg.seed)


def test_each_task_has_its_own_warm_start_length():
    assert make_cfg("task=math").model.tiny.warmstart_steps == 450
    assert make_cfg("task=tool_qa").model.tiny.warmstart_steps == 1000
    assert make_cfg("task=logic").model.tiny.warmstart_steps == 1200
    assert make_cfg("task=tool_qa", "model.tiny.warmstart_steps=300").model.tiny.warmstart_steps == 300


def test_rl_only_settings_keep_the_key():
    base = key("task=math")
    for override in ("task.eval_size=7", "task.reward=binary", "task.format_reward=0.5", "algo=grpo"):
        assert key("task=math", override) == base, override
    assert key("task=math", "task.max_new_tokens=64") == base


def test_what_the_build_reads_changes_the_key():
    base = key("task=math")
    assert key("task=math", "model.tiny.warmstart_steps=200") != base
    assert key("task=math", "task.data_seed=3") != base
    assert key("task=tool_qa") != key("task=tool_qa", "task.max_hops=3")
    # The warm start reads min(train_size, steps × batch) examples: train_size counts below that only.
    cfg = make_cfg("task=math")
    assert warmstart_size(cfg.model.tiny, cfg.task) == 2048  # train_size 2048 < 450 steps × 32
    assert key("task=math", "task.train_size=600") != base
    assert key("task=math", "task.train_size=20000") == key("task=math", "task.train_size=30000")


def test_model_tiny_seed_shares_one_base_model_across_run_seeds():
    """By default each run seed has its own tiny model; model.tiny.seed=S gives every seed model S."""

    def effective_key(*overrides: str) -> str:
        cfg = make_cfg(*overrides)
        return tiny_key(cfg.model.tiny, cfg.task, tiny_seed(cfg.model.tiny, cfg.seed))

    assert effective_key("seed=1") != effective_key("seed=0")
    assert effective_key("seed=1", "model.tiny.seed=0") == effective_key("seed=0")
    assert effective_key("seed=2", "model.tiny.seed=0") == effective_key("seed=0", "model.tiny.seed=0")


def _hold_lock(target: str, seconds: float, queue) -> None:
    from trgrpo.models.files import cache_lock

    with cache_lock(Path(target)):
        queue.put(("in", time.time()))
        time.sleep(seconds)
        queue.put(("out", time.time()))


def test_cache_lock_makes_a_second_builder_wait(tmp_path):
    """torchrun ranks asking for the same tiny model (or GGUF folder) at once: one builds, the other
    waits for it and then finds the folder, instead of deleting it under the first one's feet."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    target = str(tmp_path / "tiny" / "math-abc")
    first = ctx.Process(target=_hold_lock, args=(target, 1.5, queue))
    first.start()
    assert queue.get(timeout=60)[0] == "in"
    second = ctx.Process(target=_hold_lock, args=(target, 0.0, queue))
    second.start()
    events = [queue.get(timeout=60) for _ in range(3)]
    first.join(30), second.join(30)
    assert [e[0] for e in events] == ["out", "in", "out"]  # the second got in only after the first left
    assert events[1][1] >= events[0][1]
