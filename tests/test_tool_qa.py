"""tool_qa: worlds, the search tool, the verifier, and the sanity bar (search helps, guessing does not)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from trgrpo.config.schema import ConfigError, ToolQATaskConfig
from trgrpo.run.records import Example
from trgrpo.tasks.tool_qa import ToolQATask
from trgrpo.tasks.tool_qa_world import YEARS, build_world, word_split

# How a rule-based reader finds each relation in a document (it knows the templates, not the world).
PATTERNS = {
    "employer": r"{name} works for (\w+)\.",
    "birthplace": r"{name} was born in \d+ in (\w+)\.",
    "birth_year": r"{name} was born in (\d+)",
    "founder": r"{name} was founded by (\w+ \w+) in",
    "founded": r"{name} was founded (?:by \w+ \w+ )?in (\d+)",
    "headquarters": r"{name} is headquartered in (\w+)\.",
    "mayor": r"The mayor of {name} is (\w+ \w+)\.",
}
NOUNS = {
    "employer": "employer",
    "birthplace": "birthplace",
    "birth year": "birth_year",
    "founder": "founder",
    "founding year": "founded",
    "headquarters": "headquarters",
    "mayor": "mayor",
}
ASKS = {"Who": "person", "Which company": "company", "Which city": "city", "What": "year"}


def parse_question(question: str) -> tuple[str, str, list[str]]:
    """(answer kind, anchor name, relations in lookup order) of "Which city is the X of the Y of Name?"."""
    ask, body = re.match(r"^(Who|Which company|Which city|What) is (.*)\?$", question).groups()
    *nouns, anchor = body.split(" of ")
    return ASKS[ask], anchor, [NOUNS[noun.removeprefix("the ")] for noun in reversed(nouns)]


def scripted_agent(task: ToolQATask, example: Example) -> str:
    """Search the current entity, read the relation off the returned docs by string matching, repeat."""
    question = example.prompt.split("Question: ")[-1]
    _, current, relations = parse_question(question)
    response = ""
    for relation in relations:
        observation = task.tools["search"](current, example)
        response += f"<search>{current}</search>{observation}"
        found = re.search(PATTERNS[relation].format(name=re.escape(current)), observation)
        if found is None:
            break
        current = found.group(1)
    return response + f"<answer>{current}</answer>"


@pytest.fixture(scope="module")
def task() -> ToolQATask:
    return ToolQATask(ToolQATaskConfig(min_hops=2, max_hops=2))


@pytest.fixture(scope="module")
def test_set(task: ToolQATask) -> list[Example]:
    return list(task.dataset("test", 300, seed=0))


def _name_words(world) -> list[str]:
    return [word.lower() for name in world.entities for word in name.split()]


def test_scripted_search_agent_answers_most_two_hop_questions(
    task: ToolQATask, test_set: list[Example]
) -> None:
    rewards = [task.verify(ex, scripted_agent(task, ex)) for ex in test_set]
    accuracy = sum(r.score for r in rewards) / len(rewards)
    print(f"scripted search agent accuracy on 2-hop test questions: {accuracy:.3f}")
    assert accuracy >= 0.85
    assert all(r.components["diag_searches"] == 2.0 for r in rewards)
    assert sum(r.components["diag_evidence_recall"] for r in rewards) / len(rewards) >= 0.85


def test_answering_without_search_is_near_chance(task: ToolQATask, test_set: list[Example]) -> None:
    train = task.dataset("train", 2000, seed=0)
    most_frequent = Counter(ex.answer for ex in train).most_common(1)[0][0]
    constant = sum(task.verify(ex, f"<answer>{most_frequent}</answer>").score for ex in test_set)
    rng = random.Random(0)
    guessed = 0.0
    for ex in test_set:
        kind, anchor, _ = parse_question(ex.prompt.split("Question: ")[-1])
        if kind == "year":
            guess = str(rng.randint(min(y[0] for y in YEARS.values()), max(y[1] for y in YEARS.values())))
        else:
            guess = rng.choice([e.name for e in task.world(ex).of_kind(kind) if e.name != anchor])
        guessed += task.verify(ex, f"<answer>{guess}</answer>").score
        assert (
            task.verify(ex, f"<answer>{anchor}</answer>").score == 0.0
        )  # never answerable from the question
    assert constant / len(test_set) < 0.15
    assert guessed / len(test_set) < 0.15


def test_worlds_have_unique_words_and_disjoint_split_pools(task: ToolQATask) -> None:
    cfg = task.cfg
    words = {}
    for split in ("train", "test"):
        seeds = {ex.meta["world_seed"] for ex in task.dataset(split, 20 * cfg.questions_per_world, seed=1)}
        assert len(seeds) == 20
        words[split] = set()
        for seed in seeds:
            world = build_world(seed, split, cfg.world_people, cfg.world_companies, cfg.world_cities)
            assert (
                len(world.of_kind("person")) == cfg.world_people
                and len(world.of_kind("city")) == cfg.world_cities
            )
            own = _name_words(world)
            assert len(own) == len(set(own)), "a word is shared by two names"
            assert all(word_split(w) == split for w in own)
            words[split] |= set(own)
    assert not words["train"] & words["test"]


def test_data_is_deterministic_disjoint_and_plain(task: ToolQATask, test_set: list[Example]) -> None:
    train = task.dataset("train", 300, seed=0)
    assert task.dataset("train", 300, seed=0) == train
    assert task.dataset("train", 300, seed=1) != train
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test_set}
    assert len({ex.prompt for ex in train}) == len(train)
    assert pickle.loads(pickle.dumps(train)) == train
    ex = train[0]
    assert ex.level == "hops=2" and len(ex.meta["evidence"]) == 2 and ex.meta["aliases"] == [ex.answer]
    assert ex.meta["split"] == "train" and isinstance(ex.meta["world_seed"], int)


def test_hops_range_and_demonstrations_verify(tmp_path) -> None:
    task = ToolQATask(ToolQATaskConfig(min_hops=1, max_hops=4, calc=True, questions_per_world=16))
    examples = task.dataset("train", 160, seed=2)
    assert {ex.level for ex in examples} >= {
        "hops=1",
        "hops=2",
        "hops=3",
        "hops=4",
        "hops=2,calc",
        "hops=4,calc",
    }
    for ex in examples:
        segments = task.demonstration(ex)
        assert [t for _, t in segments] == [True, False] * (len(segments) // 2) + [True]
        for (call, _), (observation, _) in zip(segments[::2], segments[1::2]):
            tool = task.tools["calc" if call.startswith("<calc>") else "search"]
            assert observation == tool(call[len(tool.open_tag) : -len(tool.close_tag)], ex)
        reward = task.verify(ex, "".join(text for text, _ in segments))
        assert reward.score == 1.0 and reward.components["diag_evidence_recall"] == 1.0, segments


def test_demo_slip_answers_the_bridge_entity_after_one_search() -> None:
    """task.demo_slip for tool_qa: that share of multi-hop demonstrations stops after the first search
    and answers the entity it found (the next hop's title), the classic stop-too-early error."""
    cfg = ToolQATaskConfig(min_hops=1, max_hops=2, questions_per_world=16, demo_slip=1.0)
    task = ToolQATask(cfg)
    examples = task.dataset("train", 64, seed=2)
    two_hop = [ex for ex in examples if len(ex.meta["evidence"]) == 2]
    one_hop = [ex for ex in examples if len(ex.meta["evidence"]) == 1]
    assert two_hop and one_hop
    for ex in two_hop:
        first, bridge = ex.meta["evidence"]
        segments = task.demonstration(ex)
        assert segments == [
            (f"<search> {first}</search>", True),
            (task.tools["search"](first, ex), False),
            (f"<answer> {bridge}</answer>", True),
        ]
        assert task.verify(ex, "".join(text for text, _ in segments)).score == 0.0
    for ex in one_hop:  # nothing to stop early on
        assert task.verify(ex, "".join(text for text, _ in task.demonstration(ex))).score == 1.0

    half = ToolQATask(ToolQATaskConfig(min_hops=2, max_hops=2, questions_per_world=16, demo_slip=0.5))
    many = half.dataset("train", 400, seed=2)
    slipped = sum(half.verify(ex, "".join(t for t, _ in half.demonstration(ex))).score == 0.0 for ex in many)
    assert 0.42 < slipped / len(many) < 0.58
    with pytest.raises(ConfigError, match=r"task\.demo_slip=-0\.1"):
        ToolQATask(ToolQATaskConfig(demo_slip=-0.1))


def test_search_tool_output(task: ToolQATask, test_set: list[Example]) -> None:
    ex = test_set[0]
    search = task.tools["search"]
    anchor = ex.meta["evidence"][0]
    observation = search(anchor, ex)
    assert observation.startswith(f"\n<information>Doc 1(Title: {anchor}) {anchor} ")
    assert observation.endswith("</information>\n") and observation.count("(Title: ") == task.cfg.top_k
    assert (
        search("", ex)
        == search("the of and", ex)
        == search("zzqx", ex)
        == "\n<information>No results.</information>\n"
    )
    assert search(f"{anchor} " * 10_000, ex).count("(Title: ") <= task.cfg.top_k
    assert search(anchor.lower(), ex) == observation


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<answer>Tavo Melrik</answer>", 1.0),
        ("<answer> the  TAVO melrik. </answer>", 1.0),
        ("<search>Tavo</search><answer>Tavo Melrik</answer>", 1.0),
        ("<answer>Gira Stuvo</answer> then <answer>Tavo Melrik</answer>", 1.0),
        ("<answer>Tavo Melrik</answer> no, <answer>Gira Stuvo</answer>", 0.0),
        ("", 0.0),
        ("Tavo Melrik", 0.0),
        ("<answer>Melrik</answer>", 0.0),
        ("<answer>Tavo Melrik and Gira Stuvo</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>the</answer>", 0.0),
        ("<answer>Tavo Melrik", 0.0),
        ("<answer>Távo Melrik</answer>", 0.0),
        ("<answer>Tavo Melrik 🙂</answer>", 0.0),  # SQuAD normalisation keeps symbols
        ("<answer>" + "Tavo Melrik " * 200 + "</answer>", 0.0),
        ("y" * 1_000_000 + "<answer>Tavo Melrik</answer>", 1.0),
    ],
)
def test_verifier_table(task: ToolQATask, response: str, score: float) -> None:
    example = Example(
        "q",
        "Question: Who is the mayor of … <answer>Tavo Melrik</answer>",
        "Tavo Melrik",
        "hops=2",
        {"aliases": ["Tavo Melrik"], "evidence": ["Kelm", "Vale"], "world_seed": 1, "split": "test"},
    )
    reward = task.verify(example, response)
    assert reward.score == score
    assert reward.components["correct"] == score and not reward.unscorable


def test_diagnostics_count_the_trajectory(task: ToolQATask) -> None:
    example = Example("q", "p", "1990", "hops=2", {"aliases": ["1990"], "evidence": ["Kelm", "Vale"]})
    response = (
        "<search>kelm</search>\n<information>Doc 1(Title: Kelm) …</information>\n"
        "<search>x</search>\n<information>Doc 1(Title: Other) …</information>\n<answer>in 1990</answer>"
    )
    components = task.verify(example, response).components
    assert components == {
        "correct": 0.0,
        "diag_searches": 2.0,
        "diag_turns": 3.0,
        "diag_answer_words": 2.0,
        "diag_evidence_recall": 0.5,
    }


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="binary"):
        ToolQATask(ToolQATaskConfig(reward="logic_rl"))
    with pytest.raises(ValueError, match="corpus_path"):
        ToolQATask(ToolQATaskConfig(questions_path="q.jsonl"))


def test_bm25s_is_imported_only_on_first_search() -> None:
    code = "import sys, trgrpo.tasks.tool_qa as t; t.ToolQATask(t.ToolQATaskConfig()); assert 'bm25s' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_data_path(tmp_path) -> None:
    corpus = [
        {"title": "Lake Ontario", "text": "Lake Ontario is the smallest of the Great Lakes by surface area."},
        {"title": "Mount Kosciuszko", "text": "Mount Kosciuszko is the highest mountain in Australia."},
        {"contents": '"Ottawa"\nOttawa is the capital city of Canada.'},
    ]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus))
    for split, rows in {
        "train": [
            {"question": "What is the capital of Canada?", "golden_answers": ["Ottawa", "Ottawa, Ontario"]}
        ],
        "test": [{"question": "Highest mountain in Australia?", "answers": ["Mount Kosciuszko"]}],
    }.items():
        (tmp_path / f"qa_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ToolQATaskConfig(
        questions_path=str(tmp_path / "qa_{split}.jsonl"), corpus_path=str(tmp_path / "corpus.jsonl")
    )
    task = ToolQATask(cfg)
    (train,), (test,) = task.dataset("train", 10, seed=0), task.dataset("test", 10, seed=0)
    assert train.answer == "Ottawa" and test.answer == "Mount Kosciuszko" and train.level == "real"
    observation = task.tools["search"]("capital of Canada", train)
    assert observation.startswith("\n<information>Doc 1(Title: Ottawa) Ottawa is the capital city of Canada.")
    assert task.verify(train, "<answer>ottawa, ontario</answer>").score == 1.0
    assert task.verify(test, "<answer>Ottawa</answer>").score == 0.0
    segments = task.demonstration(test)
    assert task.verify(test, "".join(text for text, _ in segments)).score == 1.0
    assert "diag_evidence_recall" not in task.verify(test, "").components


def test_worlds_are_the_same_in_every_process() -> None:
    code = (
        "import hashlib, trgrpo.tasks.tool_qa as t; task = t.ToolQATask(t.ToolQATaskConfig(max_hops=3)); "
        "exs = task.dataset('train', 64, seed=5); "
        "print(hashlib.sha256(repr([(e.prompt, e.answer, task.tools['search'](e.answer, e)) for e in exs]).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2)
    }
    assert len(digests) == 1 and len(digests.pop().strip()) == 64
