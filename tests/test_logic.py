"""logic (Knights and Knaves): data splits, the verifier on gold/flipped answers, adversarial outputs."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from trgrpo.config.schema import LogicTaskConfig
from trgrpo.run.records import Example
from trgrpo.tasks.logic import LogicTask, render_solution

NAMES = ["Ava", "Liam", "Zoey"]
SOLUTION = [True, False, True]
TERMS = ["saint", "sinner"]
GOLD = "Ava is a saint, Liam is a sinner, and Zoey is a saint"
# The prompt holds a correct answer: the verifier must never look at it.
EXAMPLE = Example(
    "kk",
    f"Puzzle … e.g. <answer>{GOLD}</answer>",
    GOLD,
    "people=3",
    {"names": NAMES, "solution": SOLUTION, "terms": TERMS},
)


@pytest.fixture(scope="module")
def task() -> LogicTask:
    return LogicTask(LogicTaskConfig(min_people=2, max_people=5))


@pytest.fixture(scope="module")
def items(task: LogicTask) -> list[Example]:
    return [*task.dataset("train", 240, seed=0), *task.dataset("test", 60, seed=0)]


def test_gold_scores_one_and_every_single_flip_scores_zero(task: LogicTask, items: list[Example]) -> None:
    for ex in items:
        (demo, trainable), *rest = task.demonstration(ex)
        assert trainable and not rest
        assert task.verify(ex, demo).score == 1.0, (ex.prompt, demo)
        names, solution, terms = ex.meta["names"], ex.meta["solution"], ex.meta["terms"]
        for i in range(len(names)):
            flipped = [role != (j == i) for j, role in enumerate(solution)]
            wrong = f"<think>…</think><answer>{render_solution(names, flipped, terms)}</answer>"
            assert task.verify(ex, wrong).score == 0.0, (ex.prompt, wrong)


def test_data_mixes_people_and_is_plain(task: LogicTask, items: list[Example]) -> None:
    assert {ex.level for ex in items} == {"people=2", "people=3", "people=4", "people=5"}
    assert all(len(ex.meta["names"]) == int(ex.level.split("=")[1]) for ex in items)
    assert pickle.loads(pickle.dumps(items)) == items  # examples travel to verifier processes
    assert all("Format your answer" not in ex.prompt and "<answer>" in ex.prompt for ex in items)


def test_splits_are_disjoint_and_deterministic(task: LogicTask) -> None:
    train = task.dataset("train", 400, seed=3)
    test = task.dataset("test", 400, seed=3)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    assert task.dataset("train", 400, seed=3) == train
    assert task.dataset("train", 50, seed=4) != train[:50]
    with pytest.raises(ValueError, match="split"):
        task.dataset("validation", 1, seed=0)


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (f"<think>ok</think><answer>{GOLD}</answer>", 1.0),
        (f"<answer>{GOLD}.</answer>", 1.0),
        ("<answer>ava: SAINT; liam: Sinner; zoey: saint</answer>", 1.0),  # no article, any case
        ("<answer>Zoey is a saint, Ava is a saint, Liam is a sinner</answer>", 1.0),  # any order
        ("<answer>Ava is a saint ✓, Liam is a sinner 🙂, and Zoey is a saint</answer>", 1.0),
        ("", 0.0),
        (GOLD, 0.0),  # no tags
        (f"<answer>{GOLD}", 0.0),  # unclosed
        (
            f"<answer>{GOLD}</answer> <answer>Ava is a sinner, Liam is a sinner, and Zoey is a saint</answer>",
            0.0,
        ),
        (
            f"<answer>Ava is a sinner, Liam is a sinner, and Zoey is a saint</answer> <answer>{GOLD}</answer>",
            1.0,
        ),
        ("<answer>Ava is a saint and Liam is a sinner</answer>", 0.0),  # Zoey missing
        ("<answer>Ava is a saint or a sinner, Liam is a sinner, and Zoey is a saint</answer>", 0.0),
        ("<answer>Ava is not a sinner, Liam is a sinner, and Zoey is a saint</answer>", 0.0),  # negation
        (
            "<answer>Ava is a knight, Liam is a knave, and Zoey is a knight</answer>",
            0.0,
        ),  # not this item's words
        ("<answer>Ävä is a saint, Liam is a sinner, and Zoey is a saint</answer>", 0.0),
        ("<answer>Ava is a saint, Liam is a sinner, and Zoey is a saint" + " very" * 300 + "</answer>", 0.0),
        ("x" * 1_000_000 + f"<answer>{GOLD}</answer>", 1.0),
        ("<answer>" + "Ava is a saint " * 100_000 + "</answer>", 0.0),
        ("<answer>\x00\ud800</answer>", 0.0),
    ],
)
def test_verifier_table(task: LogicTask, response: str, score: float) -> None:
    start = time.perf_counter()
    reward = task.verify(EXAMPLE, response)
    assert time.perf_counter() - start < 1.0
    assert reward.score == score
    assert reward.components == {"correct": score}
    assert not reward.unscorable


def test_the_prompt_never_counts(task: LogicTask) -> None:
    assert task.verify(EXAMPLE, "").score == 0.0
    assert task.verify(EXAMPLE, "I cannot tell.").score == 0.0


@pytest.mark.parametrize(
    ("response", "total", "fmt", "answer"),
    [
        (f"<think>t</think>\n<answer>{GOLD}</answer>", 3.0, 1.0, 2.0),
        (
            "<think>t</think><answer>Ava is a sinner, Liam is a sinner, and Zoey is a saint</answer>",
            -0.5,
            1.0,
            -1.5,
        ),
        ("<think>t</think><answer>Ava is a saint</answer>", -1.0, 1.0, -2.0),
        (f"<answer>{GOLD}</answer>", -1.0, -1.0, 0.0),  # no think: format fails, answer not scored
        (f"<answer>x</answer><think>t</think><answer>{GOLD}</answer>", -1.0, -1.0, 0.0),
        ("", -1.0, -1.0, 0.0),
    ],
)
def test_logic_rl_shaping(response: str, total: float, fmt: float, answer: float) -> None:
    task = LogicTask(LogicTaskConfig(reward="logic_rl"))
    reward = task.verify(EXAMPLE, response)
    assert reward.score == pytest.approx(total)
    assert (reward.components["format"], reward.components["answer"]) == (fmt, answer)


def test_format_reward_option() -> None:
    task = LogicTask(LogicTaskConfig(format_reward=0.5))
    assert task.verify(EXAMPLE, f"<think>t</think><answer>{GOLD}</answer>").components == {
        "correct": 1.0,
        "format": 1.0,
    }
    assert task.verify(EXAMPLE, "<think>t</think><answer>?</answer>").score == 0.5
    assert task.verify(EXAMPLE, "nothing").score == 0.0


def test_demo_slip_stops_after_the_first_person() -> None:
    """task.demo_slip for logic: that share of demonstrations names the first person's role and stops
    (an unparsable answer: the others are missing), drawn once per example."""
    task = LogicTask(LogicTaskConfig(min_people=2, max_people=3, demo_slip=1.0))
    slipped = task.demonstration(EXAMPLE)
    assert slipped == [
        (
            "<think>Check every statement against each assignment; one is consistent.</think>\n"
            "<answer>Ava is a saint</answer>",
            True,
        )
    ]
    assert task.verify(EXAMPLE, slipped[0][0]).score == 0.0
    for ex in task.dataset("train", 40, seed=0):
        ((demo, _),) = task.demonstration(ex)
        first = render_solution(ex.meta["names"][:1], ex.meta["solution"][:1], ex.meta["terms"])
        assert demo.endswith(f"<answer>{first}</answer>") and task.verify(ex, demo).score == 0.0

    half = LogicTask(LogicTaskConfig(demo_slip=0.5))
    many = half.dataset("train", 400, seed=1)
    wrong = sum(half.verify(ex, half.demonstration(ex)[0][0]).score == 0.0 for ex in many)
    assert 0.42 < wrong / len(many) < 0.58
    faithful = LogicTask(LogicTaskConfig(demo_slip=0.0))
    assert all(faithful.verify(ex, faithful.demonstration(ex)[0][0]).score == 1.0 for ex in many)
    with pytest.raises(ValueError, match=r"task\.demo_slip=1\.2"):
        LogicTask(LogicTaskConfig(demo_slip=1.2))


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="binary, logic_rl"):
        LogicTask(LogicTaskConfig(reward="partial"))
    with pytest.raises(ValueError, match="min_people"):
        LogicTask(LogicTaskConfig(min_people=4, max_people=3))


def _kk_record(i: int, with_solution: bool) -> dict:
    names = [f"Name{i}a", f"Name{i}b"]
    row = {
        "quiz": f"Island {i}. You meet 2 inhabitants: {names[0]} and {names[1]}. So who is a hero and who is a villain?",
        "names": names,
        "knight_knave": {"knight": "hero", "knave": "villain"},
        "solution_text": f"{names[0]} is a hero, and {names[1]} is a villain.",
    }
    if with_solution:
        row["solution"] = [True, False]
    return row


def test_real_data_split_folders(tmp_path) -> None:
    for split, offset in (("train", 0), ("test", 100)):
        folder = tmp_path / "kk" / split
        folder.mkdir(parents=True)
        rows = [_kk_record(offset + i, with_solution=i % 2 == 0) for i in range(6)]
        (folder / "people2_num6.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = LogicTask(LogicTaskConfig(path=str(tmp_path / "kk")))
    train, test = task.dataset("train", 100, seed=0), task.dataset("test", 4, seed=0)
    assert len(train) == 6 and len(test) == 4
    assert all(ex.meta["names"][0].startswith("Name1") for ex in test)
    for ex in [*train, *test]:
        assert ex.level == "people=2" and ex.meta["solution"] == [True, False]
        assert task.verify(ex, task.demonstration(ex)[0][0]).score == 1.0
        assert task.verify(ex, f"<answer>{ex.meta['names'][0]} is a villain</answer>").score == 0.0


def test_real_data_single_file_is_split_by_hash(tmp_path) -> None:
    path = tmp_path / "kk.jsonl"
    path.write_text("\n".join(json.dumps(_kk_record(i, with_solution=True)) for i in range(40)))
    task = LogicTask(LogicTaskConfig(path=str(path)))
    train, test = task.dataset("train", 100, seed=0), task.dataset("test", 100, seed=0)
    assert len(train) + len(test) == 40 and train and test
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
