"""math task: extraction and verification tables with adversarial outputs, data splits, and the
verifier pool's timeout and crash handling."""

from __future__ import annotations

import time

import pytest
import slow_task
from conftest import make_cfg
from slow_task import MisbehavingTask

from trgrpo.config.schema import ConfigError, GeneratorConfig, MathTaskConfig, TaskConfig
from trgrpo.run.records import Example
from trgrpo.tasks import make_task, verify_pool
from trgrpo.tasks.answer import last_boxed, last_tag
from trgrpo.tasks.math_qa import gold_from
from trgrpo.tasks.verify_pool import VerifierStartError, VerifyPool


@pytest.fixture(scope="module")
def task():
    return make_task(make_cfg().task)


def ex(answer: str, prompt: str = "Compute it.") -> Example:
    return Example("t", prompt, answer)


VERDICTS = [
    # (gold, response, expected score)
    ("57", "23 + 34 = 57. The answer is \\boxed{57}.", 1.0),
    ("57", "\\boxed{56}", 0.0),
    ("57", "", 0.0),
    ("57", "57", 0.0),  # no \boxed{}: unparsable
    ("57", "\\boxed{12} then \\boxed{57}", 1.0),  # the last box counts
    ("57", "\\boxed{57} then \\boxed{12}", 0.0),
    ("57", "\\boxed{ 57 }", 1.0),
    ("1000", "\\boxed{1,000}", 1.0),
    ("-4", "\\boxed{-4}", 1.0),
    ("57", "\\boxed{57", 0.0),  # unbalanced
    ("57", "\\boxed{" + "9" * 5000 + "}", 0.0),  # huge number
    ("12345678901234567890", "\\boxed{12345678901234567890}", 1.0),
    ("57", "\\boxed{５７}", 1.0),  # full-width digits are still the number 57 (int() reads them)
    ("57", "😀 \\boxed{57} 😀", 1.0),
    ("1/2", "\\boxed{\\frac{1}{2}}", 1.0),  # math-verify path
    ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{3}{4}", "\\boxed{0.75}", 1.0),
    ("\\frac{3}{4}", "\\boxed{0.7}", 0.0),
    ("50\\%", "\\boxed{50\\%}", 1.0),
    ("x^2", "\\boxed{\\frac{}{}{}}", 0.0),
]


@pytest.mark.parametrize(("gold", "response", "expected"), VERDICTS)
def test_verdicts(task, gold, response, expected):
    reward = task.verify(ex(gold), response)
    assert reward.score == expected
    assert reward.components["correct"] == expected


def test_answer_only_in_the_prompt_scores_zero(task):
    example = ex("57", prompt="Example: \\boxed{57}. Now compute 23 + 34.")
    assert task.verify(example, "I think it is 58").score == 0.0


def test_extraction_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\fbox{3}") == "3"
    assert last_boxed("no box") is None
    assert last_tag("<answer>a</answer> <answer> b </answer>", "answer") == "b"
    assert last_tag("<answer>unclosed", "answer") is None
    assert gold_from("so 3 + 4 = 7\n#### 1,007", "gsm8k") == "1007"
    assert gold_from("thus \\boxed{\\frac{1}{2}}", "boxed") == "\\frac{1}{2}"


def test_train_and_test_never_share_a_question(task):
    cfg = make_cfg("task.train_size=2000").task
    small = make_task(cfg)
    train = {e.prompt for e in small.dataset("train", 2000, 0)}
    test = small.dataset("test", 100, 0)
    assert len(test) == 100 and not train & {e.prompt for e in test}
    again = [e.prompt for e in small.dataset("test", 100, 0)]
    assert again == [e.prompt for e in test]  # deterministic


def test_demonstrations_score_one_without_slips():
    cfg = make_cfg("task.demo_slip=0").task
    for style in ("plain", "columns"):
        cfg.demo_style = style
        task = make_task(cfg)
        for example in task.dataset("train", 50, 3):
            text = "".join(t for t, _ in task.demonstration(example))
            assert task.verify(example, text).score == 1.0


@pytest.mark.parametrize(
    ("expression", "work"),
    [
        ("47 + 38", "7 + 8 = 15, 4 + 3 + 1 = 8."),  # a carry into the tens
        ("5 + 38", "5 + 8 = 13, 0 + 3 + 1 = 4."),  # a one-digit operand: its tens are 0
        ("67 + 58", "7 + 8 = 15, 6 + 5 + 1 = 12."),  # the last column's carry is the answer's lead
        ("12 + 30", "2 + 0 = 2, 1 + 3 + 0 = 4."),  # no carry: written as + 0
        ("3 + 4", "3 + 4 = 7."),  # one column
        ("358 + 67", "8 + 7 = 15, 5 + 6 + 1 = 12, 3 + 0 + 1 = 4."),
        ("12 - 3", None),  # not a two-term addition: the plain demonstration
        ("1 + 2 + 3", None),
    ],
)
def test_column_work_by_hand(expression, work):
    from trgrpo.tasks.math_qa import column_work

    expected = None if work is None else (work, str(sum(int(term) for term in expression.split("+"))))
    assert column_work(expression) == expected


def test_column_demonstrations_score_one_and_fall_back_to_plain():
    cfg = make_cfg("task.demo_slip=0").task
    cfg.demo_style = "columns"
    columns = make_task(cfg)
    example = Example("t", "Calculate 47 + 38.", "85", meta={"expression": "47 + 38"})
    assert columns.demonstration(example) == [("7 + 8 = 15, 4 + 3 + 1 = 8. The answer is \\boxed{85}.", True)]
    minus = Example("t", "Calculate 12 - 3.", "9", meta={"expression": "12 - 3"})
    assert columns.demonstration(minus) == [("12 - 3 = 9. The answer is \\boxed{9}.", True)]
    for example in columns.dataset("train", 50, 3):
        assert columns.verify(example, columns.demonstration(example)[0][0]).score == 1.0
    cfg.demo_style = "steps"
    with pytest.raises(ConfigError, match=r"task\.demo_style=.steps."):
        make_task(cfg)


@pytest.mark.parametrize(
    ("expression", "work", "answer"),
    [
        ("47 + 38", "7 + 8 = 15, 4 + 3 + 0 = 7.", "75"),  # the carry written as 0: the classic slip
        ("67 + 58", "7 + 8 = 15, 6 + 5 + 0 = 11.", "115"),
        ("358 + 67", "8 + 7 = 15, 5 + 6 + 0 = 11, 3 + 0 + 0 = 3.", "315"),  # every carry forgotten
        ("12 + 30", "2 + 0 = 2, 1 + 3 + 0 = 4.", "42"),  # nothing to forget: the right work
        ("3 + 4", "3 + 4 = 7.", "7"),
    ],
)
def test_column_work_with_forgotten_carries_by_hand(expression, work, answer):
    from trgrpo.tasks.math_qa import column_work

    assert column_work(expression, forget_carries=True) == (work, answer)


def test_demo_slip_forgets_carries_in_that_share_of_carry_demonstrations():
    cfg = make_cfg().task
    cfg.demo_style, cfg.demo_slip = "columns", 1.0
    always = make_task(cfg)
    example = Example("t", "Calculate 47 + 38.", "85", meta={"expression": "47 + 38"})
    assert always.demonstration(example) == [("7 + 8 = 15, 4 + 3 + 0 = 7. The answer is \\boxed{75}.", True)]
    no_carry = Example("t", "Calculate 12 + 30.", "42", meta={"expression": "12 + 30"})
    assert always.verify(no_carry, always.demonstration(no_carry)[0][0]).score == 1.0

    cfg.demo_slip = 0.6
    task = make_task(cfg)
    examples = task.dataset("train", 2000, 0)
    carries = [ex for ex in examples if has_carry(ex)]
    wrong = [ex for ex in carries if task.verify(ex, task.demonstration(ex)[0][0]).score == 0.0]
    assert len(carries) > 300  # 22% of 1–2-digit additions carry
    assert 0.55 < len(wrong) / len(carries) < 0.65  # the share asked for, drawn per example
    assert task.demonstration(carries[0]) == task.demonstration(carries[0])  # fixed per example
    for ex in examples:  # only carry problems ever slip
        if ex not in carries:
            assert task.verify(ex, task.demonstration(ex)[0][0]).score == 1.0


def has_carry(example):
    from trgrpo.tasks.math_qa import column_work

    expression = example.meta.get("expression")
    return column_work(expression) != column_work(expression, forget_carries=True)


@pytest.mark.parametrize(
    ("style", "slip", "message"),
    [
        ("columns", 1.5, r"task\.demo_slip=1\.5 must lie in \[0, 1\]"),
        ("plain", 0.5, r"task\.demo_slip.*demo_style=columns"),
    ],
)
def test_demo_slip_is_checked(style, slip, message):
    cfg = make_cfg().task
    cfg.demo_style, cfg.demo_slip = style, slip
    with pytest.raises(ConfigError, match=message):
        make_task(cfg)


def test_unknown_generator_names_the_field():
    from trgrpo.config.schema import ConfigError

    cfg = MathTaskConfig(generators=[GeneratorConfig(name="no_such_generator")])
    with pytest.raises(ConfigError, match=r"task.generators\[0\]"):
        make_task(cfg).dataset("train", 4, 0)


def test_real_data_from_a_local_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "What is 2+2?", "answer": "2+2=4\\n#### 4"}\n' * 3)
    cfg = MathTaskConfig(dataset=str(path), answer_format="gsm8k", train_split="train", test_split="train")
    data = make_task(cfg).dataset("train", 2, 0)
    assert len(data) == 2 and data[0].answer == "4"
    assert make_task(cfg).verify(data[0], "\\boxed{4}").score == 1.0


def test_pool_times_out_crashes_and_survives_a_dead_worker():
    pool = VerifyPool(TaskConfig(name="misbehaving"), workers=2, timeout=2.0, factory=MisbehavingTask)
    try:
        examples = [ex("ok")] * 5
        started = time.perf_counter()
        rewards = pool.score(examples, ["ok", "sleep", "crash", "die", "nope"])
        elapsed = time.perf_counter() - started
        assert [r.score for r in rewards] == [1.0, 0.0, 0.0, 0.0, 0.0]
        assert [r.unscorable for r in rewards] == [False, True, True, True, False]
        assert elapsed < 2.0 + 8.0  # the hung sample is cut at its timeout (plus worker start-up)
        again = pool.score([ex("ok")] * 3, ["ok", "ok", "x"])  # the pool still works afterwards
        assert [r.score for r in again] == [1.0, 1.0, 0.0]
    finally:
        pool.close()


def test_workers_that_cannot_build_the_task_fail_the_pool_instead_of_hanging():
    """Without the guard pebble restarts such workers forever and `score` never returns."""
    pool = VerifyPool(
        TaskConfig(name="misbehaving"), workers=2, timeout=2.0, factory=slow_task.broken_in_workers
    )
    started = time.perf_counter()
    with pytest.raises(VerifierStartError, match=r"could not build the task \(ImportError: no module named"):
        pool.score([ex("ok")] * 3, ["ok", "ok", "x"])
    assert time.perf_counter() - started < 30
    assert pool.pool is None  # stopped


def test_workers_that_die_at_start_fail_the_pool_instead_of_scoring_zero():
    """Such workers break the pebble pool: every sample would come back unscorable (a step of zero
    rewards) and every later call would raise. The pool is started again once, then it gives up."""
    pool = VerifyPool(
        TaskConfig(name="misbehaving"), workers=2, timeout=2.0, factory=slow_task.dies_in_workers
    )
    with pytest.raises(VerifierStartError, match=r"die before they run a sample \(twice\).*verify_workers=0"):
        pool.score([ex("ok")] * 3, ["ok", "ok", "x"])
    assert pool.pool is None


def test_a_pool_broken_while_idle_is_started_again():
    pool = VerifyPool(TaskConfig(name="misbehaving"), workers=1, timeout=2.0, factory=MisbehavingTask)
    try:
        assert [r.score for r in pool.score([ex("ok")] * 2, ["ok", "x"])] == [1.0, 0.0]
        for worker in list(pool.pool._pool_manager.worker_manager.workers.values()):
            worker.kill()  # as the kernel's OOM killer would, between two steps
        time.sleep(0.5)
        rewards = pool.score([ex("ok")] * 3, ["ok", "ok", "x"])
        assert [r.score for r in rewards] == [1.0, 1.0, 0.0] and not any(r.unscorable for r in rewards)
    finally:
        pool.close()


def test_workers_that_never_start_fail_the_pool_after_the_start_limit(monkeypatch):
    monkeypatch.setattr(verify_pool, "START_LIMIT", 4.0)
    pool = VerifyPool(
        TaskConfig(name="misbehaving"), workers=1, timeout=1.0, factory=slow_task.hangs_in_workers
    )
    started = time.perf_counter()
    with pytest.raises(VerifierStartError, match=r"no verifier worker started within 4 s.*verify_workers=0"):
        pool.score([ex("ok")], ["ok"])
    assert 4.0 <= time.perf_counter() - started < 20
    assert pool.pool is None


def test_pathological_latex_is_cut_at_the_timeout():
    """A nested expression that math-verify takes long on: the pool returns within timeout + margin."""
    cfg = make_cfg().task
    pool = VerifyPool(cfg, workers=1, timeout=1.0)
    try:
        pool.score([ex("1")], ["\\boxed{1}"])  # warm the worker (imports)
        bomb = "\\boxed{10^{10^{10}}}"  # math-verify spends its own 5 s timeout on this
        started = time.perf_counter()
        rewards = pool.score([ex("\\frac{1}{2}")], [bomb])
        assert time.perf_counter() - started < 1.0 + 3.0
        assert rewards[0].score == 0.0 and rewards[0].unscorable
    finally:
        pool.close()


# The cheapest ways to earn a format bonus without answering, and answers that earn it. The bonus is 0.2.
FORMAT_HACKS = [
    ("57", "… which is the result of \\boxed{}.", 0.0, 0.0),  # the hack a real model found: an empty box
    ("57", "\\boxed{ }", 0.0, 0.0),
    ("57", "\\boxed{the}", 0.0, 0.0),  # math-verify would read a word as a product of symbols
    ("57", "\\boxed{answer}", 0.0, 0.0),
    ("57", "\\boxed{57} and then \\boxed{}", 0.0, 0.0),  # the last box is the answer
    ("57", "The answer is 57.", 0.0, 0.0),
    ("57", "\\boxed{56}", 0.2, 1.0),  # a wrong number is still an answer in the right form
    ("57", "\\boxed{57}", 1.2, 1.0),
    ("\\frac{3}{4}", "\\boxed{0.7}", 0.2, 1.0),
    ("x^2", "\\boxed{x^2}", 1.2, 1.0),  # right without a digit: correctness implies the form
]


@pytest.mark.parametrize(("gold", "response", "score", "form"), FORMAT_HACKS)
def test_format_bonus_needs_an_answer(gold, response, score, form):
    shaped = make_task(make_cfg("task.format_reward=0.2").task)
    reward = shaped.verify(ex(gold), response)
    assert reward.score == pytest.approx(score)
    assert reward.components["format"] == form


def test_few_shot_examples_in_the_user_message_for_train_and_test():
    shots = "task.few_shot=[{question: 'Calculate 12 + 30.', answer: 'The answer is 42.'}]"
    plain, shot = make_task(make_cfg().task), make_task(make_cfg(shots, "task.prompt_suffix=").task)
    for split in ("train", "test"):
        before, after = plain.dataset(split, 3, seed=0), shot.dataset(split, 3, seed=0)
        for a, b in zip(before, after):
            question = a.prompt.removesuffix(make_cfg().task.prompt_suffix).strip()
            assert b.prompt == f"Example: Calculate 12 + 30.\nAnswer: The answer is 42.\n\nNow: {question}"
            assert (b.id, b.answer, b.context) == (a.id, a.answer, ())
    assert shot.verify(after[0], f"\\boxed{{{after[0].answer}}}").score == 1.0  # the wrapped verifier


def test_few_shot_problems_are_one_line_config_errors():
    from trgrpo.config.validation import problems

    found = " ".join(problems(make_cfg("task.few_shot_style=system")))
    assert "task.few_shot_style='system' is not valid; choose one of: user, chat" in found
    found = " ".join(problems(make_cfg("task.few_shot=[{question: q}]")))
    assert "task.few_shot[0] needs a 'question' and an 'answer'" in found
