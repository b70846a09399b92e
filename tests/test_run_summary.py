"""The line a finished run ends with: held-out accuracy from its first to its last evaluation, and
the training reward of the first and last fifth of the steps, read from metrics.jsonl."""

from __future__ import annotations

import json

from trgrpo.run.metrics import run_summary


def _rows():
    rows = [{"step": 0, "eval/math/accuracy": 0.5}]
    for step in range(1, 11):  # reward/mean 0.1, 0.2, ..., 1.0
        rows.append({"step": step, "reward/mean": step / 10})
    rows[-1]["eval/math/accuracy"] = 0.75
    return rows


def test_hand_computed_summary():
    """Held-out 0.500 at step 0 → 0.750 at step 10: +0.250. Ten steps, a fifth is 2: the first fifth's
    reward is (0.1 + 0.2) / 2 = 0.150, the last's (0.9 + 1.0) / 2 = 0.950: +0.800."""
    line = run_summary(_rows(), "math")
    assert "held-out eval/math/accuracy 0.500 (step 0) → 0.750 (step 10): +0.250" in line
    assert "reward/mean 0.150 → 0.950 (first → last fifth of 10 steps): +0.800" in line


def test_a_resumed_run_is_read_whole(tmp_path):
    """The summary reads the file, so steps logged before a resume count; no evaluation: reward only."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/mean": 0.0 if s <= 5 else 1.0} for s in range(1, 11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = run_summary([json.loads(x) for x in path.read_text().splitlines()], "math")
    assert "held-out" not in line
    assert "reward/mean 0.000 → 1.000 (first → last fifth of 10 steps): +1.000" in line


def test_nothing_to_say():
    assert run_summary([], "math") is None
    assert run_summary([{"step": 1, "reward/mean": 0.3}], "math") is None


def test_a_finished_run_logs_its_summary(tmp_path, caplog):
    """End to end: two steps of the fast tiny run with an evaluation at steps 0 and 2."""
    import logging

    from conftest import FAST, make_cfg

    from trgrpo.train import run

    cfg = make_cfg(*FAST, "trainer.steps=2", "trainer.eval_every=2")
    with caplog.at_level(logging.INFO, logger="trgrpo"):
        run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = "finished: " + run_summary(rows, "math")
    assert expected in [r.getMessage() for r in caplog.records]
    assert "(step 0) →" in expected and "(step 2)" in expected and "first → last fifth of 2 steps" in expected
