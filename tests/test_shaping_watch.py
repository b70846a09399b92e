"""The run warns when its reward rises while the reward's correctness part does not: a shaping term
(a format bonus) is being learned instead of the task."""

from __future__ import annotations

import logging

import pytest

from trgrpo.config.schema import LoggerConfig
from trgrpo.run.metrics import MetricsLogger, reward_without_correctness

# The gamed run of the real model: the format share rose from ~8% to 97% while correct stayed at 0.
GAMED = [(0.02 + 0.2 * 0.9 * k / 29, 0.0) for k in range(30)]
LEARNING = [(0.1 + 0.5 * k / 29, 0.1 + 0.5 * k / 29) for k in range(30)]  # reward = correct
FLAT = [(0.5, 0.5)] * 30


def test_the_gamed_run_is_flagged_with_its_numbers():
    # first fifth: steps 0-5, mean reward 0.02 + 0.18·(2.5/29) = 0.0355; last fifth: steps 24-29, mean
    # 0.02 + 0.18·(26.5/29) = 0.1845; correct 0 → 0.
    message = reward_without_correctness([r for r, _ in GAMED], [c for _, c in GAMED])
    assert message is not None
    assert "reward/mean rose 0.036 → 0.184" in message and "reward/correct went 0.000 → 0.000" in message


@pytest.mark.parametrize("history", [LEARNING, FLAT, GAMED[:9]])  # learning, nothing, too short to say
def test_learning_flat_and_short_runs_are_not_flagged(history):
    assert reward_without_correctness([r for r, _ in history], [c for _, c in history]) is None


def test_correctness_that_rises_with_a_bonus_is_not_flagged():
    # reward = correct + 0.2·format, the format share 0.5 → 1 and correct 0.1 → 0.3: both rise
    rewards = [0.1 + 0.2 * k / 29 + 0.2 * (0.5 + 0.5 * k / 29) for k in range(30)]
    correct = [0.1 + 0.2 * k / 29 for k in range(30)]
    assert reward_without_correctness(rewards, correct) is None


def test_the_logger_warns_once(tmp_path, caplog):
    logger = MetricsLogger(tmp_path, LoggerConfig(console=False), config={}, total_steps=30)
    with caplog.at_level(logging.WARNING, logger="trgrpo"):
        for step, (reward, correct) in enumerate(GAMED, start=1):
            logger.log(step, {"reward/mean": reward, "reward/correct": correct})
    logger.close()
    warned = [r.message for r in caplog.records if "reward/correct" in r.message]
    assert len(warned) == 1 and "shaping" in warned[0]
