"""logic: Knights and Knaves puzzles, from reasoning-gym's generator or the K&K dataset files.

The response thinks inside `<think>…</think>` and states every inhabitant's role inside the last
`<answer>…</answer>`, one "Name is a <role>" clause per person. Scoring reads the roles from the
answer by name, using the item's own pair of role words (knight/knave, saint/sinner, …) and its
solution, never by string equality with a reference sentence. A person with no role, with both roles,
or with a negated role ("is not a knight") makes the answer unparsable.

Train and test never share a puzzle: a puzzle belongs to one split by a hash of its text, whatever the
seeds (small puzzle spaces repeat, so disjoint seeds alone would not be enough).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trgrpo.config.schema import ConfigError, LogicTaskConfig
from trgrpo.run.records import Example, Reward
from trgrpo.tasks.answer import last_tag
from trgrpo.tasks.data import check_demo_slip, demo_slips

REWARDS = ("binary", "logic_rl")
TEST_SEED_OFFSET = 1_000_003  # test data also comes from seeds far from any training seed
INSTRUCTION = (
    "Think inside <think> </think>, then give each person's role inside <answer> </answer>, "
    'one "Name is a role" clause per person.'
)
DEMO_THINK = "<think>Check every statement against each assignment; one is consistent.</think>\n"
_FORMAT_HINT = re.compile(r"\s*\(Format your answer like:.*\)\s*$", re.DOTALL)
_WORD = re.compile(r"[^\W_]+")
_NEGATIONS = frozenset({"not", "no", "never", "isn", "isnt", "neither", "nor"})
_LOGIC_RL_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def split_of(text: str) -> str:
    """The split a puzzle belongs to, from a stable hash of its text."""
    return "test" if hashlib.sha256(text.encode()).digest()[0] % 2 else "train"


def with_article(role: str) -> str:
    return f"{'an' if role[:1].lower() in 'aeiou' else 'a'} {role}"


def render_solution(names: Sequence[str], solution: Sequence[bool], terms: Sequence[str]) -> str:
    """ "A is a knight, B is a knave, and C is a knave" (the demonstration's and the gold's form)."""
    clauses = [
        f"{name} is {with_article(terms[0] if role else terms[1])}" for name, role in zip(names, solution)
    ]
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def parse_roles(answer: str, names: Sequence[str], terms: Sequence[str]) -> list[bool] | None:
    """Each person's role (True = the truthful role) as claimed in `answer`; None if any is missing.

    Words are read left to right: a name opens a clause, and a role word belongs to the latest name.
    A person claimed with both roles, or with a negation in the clause, counts as missing.
    """
    lowered = {name.lower(): name for name in names}
    truthful, liar = terms[0].lower(), terms[1].lower()
    claims: dict[str, set[str]] = {name: set() for name in lowered}
    current, negated = None, False
    for word in _WORD.findall(answer.lower()):
        if word in lowered:
            current, negated = word, False
        elif word in _NEGATIONS:
            negated = True
        elif word in (truthful, liar) and current is not None:
            claims[current].add("?" if negated else word)
    roles = []
    for name in lowered:
        if len(claims[name]) != 1 or "?" in claims[name]:
            return None
        roles.append(claims[name] == {truthful})
    return roles


def logic_rl_format_ok(response: str) -> bool:
    """Logic-RL's structure check: each of the four tags exactly once, in think-then-answer order."""
    positions = []
    for tag in _LOGIC_RL_TAGS:
        if response.count(tag) != 1:
            return False
        positions.append(response.find(tag))
    return positions == sorted(positions)


class LogicTask:
    """Knights and Knaves; `reward=binary` (1/0) or `reward=logic_rl` (Logic-RL's shaped reward)."""

    name = "logic"
    tools: dict = {}  # noqa: RUF012 - single-turn
    stop: tuple[str, ...] = ("</answer>",)

    def __init__(self, cfg: LogicTaskConfig):
        if cfg.reward not in REWARDS:
            raise ConfigError(
                f"task.reward={cfg.reward!r} is not valid for logic; choose one of: {', '.join(REWARDS)}"
            )
        if not 1 <= cfg.min_people <= cfg.max_people:
            raise ConfigError(
                f"task.min_people={cfg.min_people} and task.max_people={cfg.max_people}: need 1 ≤ min ≤ max"
            )
        check_demo_slip(cfg.demo_slip)
        self.cfg = cfg

    # ----------------------------------------------------------------------------------------- data

    def dataset(self, split: str, size: int, seed: int) -> Sequence[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if self.cfg.path is not None:
            return self._from_files(split, size, seed)
        return self._generated(split, size, seed)

    def _generated(self, split: str, size: int, seed: int) -> list[Example]:
        import reasoning_gym

        cfg = self.cfg
        base = seed + (TEST_SEED_OFFSET if split == "test" else 0)
        people = list(range(cfg.min_people, cfg.max_people + 1))
        sources = {
            n: reasoning_gym.create_dataset(
                "knights_knaves",
                n_people=n,
                depth_constraint=cfg.depth_constraint,
                width_constraint=cfg.width_constraint,
                size=10**9,  # nominal: items are indexed directly and item i depends only on seed + i
                seed=base + 7919 * n,
            )
            for n in people
        }
        examples: list[Example] = []
        index = 0
        while len(examples) < size:
            n = people[index % len(people)]
            item = sources[n][index // len(people)]
            index += 1
            if split_of(item["question"]) != split:
                continue
            meta = item["metadata"]
            terms = (str(meta["knight_knave_terms"]["knight"]), str(meta["knight_knave_terms"]["knave"]))
            names = [str(name) for name in meta["names"]]
            solution = [bool(role) for role in meta["solution"]]
            examples.append(
                self._example(
                    f"logic-{split}-{seed}-{len(examples)}", item["question"], names, solution, terms
                )
            )
        return examples

    def _from_files(self, split: str, size: int, seed: int) -> list[Example]:
        from trgrpo.tasks.data import load_records

        path = Path(self.cfg.path).expanduser()
        # The K&K release keeps splits in folders (data/train/…, data/test/…); otherwise split by hash.
        split_folder = path / split if (path / split).is_dir() else None
        rows = load_records(str(split_folder or path), split, what="task.path")
        if split_folder is None:
            rows = [row for row in rows if split_of(str(row.get("quiz", ""))) == split]
        random.Random(seed).shuffle(rows)
        return [self._from_record(f"logic-{split}-{seed}-{i}", row) for i, row in enumerate(rows[:size])]

    def _from_record(self, uid: str, row: dict[str, Any]) -> Example:
        """A K&K record: `quiz`, `names`, `solution` (bools) or `solution_text`, optional `knight_knave`."""
        if "quiz" not in row or "names" not in row:
            raise ConfigError(
                f"task.path={self.cfg.path!r}: K&K records need 'quiz' and 'names' (got {sorted(row)})"
            )
        kk = row.get("knight_knave") or {}
        terms = (str(kk.get("knight", "knight")), str(kk.get("knave", "knave")))
        names = [str(name) for name in row["names"]]
        if row.get("solution") is not None:
            solution = [bool(role) for role in row["solution"]]
        else:
            parsed = parse_roles(str(row.get("solution_text", "")), names, terms)
            if parsed is None:
                raise ConfigError(
                    f"task.path={self.cfg.path!r}: cannot read the solution of {row['quiz'][:80]!r}"
                )
            solution = parsed
        return self._example(uid, str(row["quiz"]), names, solution, terms)

    @staticmethod
    def _example(
        uid: str, question: str, names: list[str], solution: list[bool], terms: tuple[str, str]
    ) -> Example:
        prompt = f"{_FORMAT_HINT.sub('', question).strip()}\n{INSTRUCTION}"
        meta = {"names": names, "solution": solution, "terms": list(terms)}
        return Example(uid, prompt, render_solution(names, solution, terms), f"people={len(names)}", meta)

    # ------------------------------------------------------------------------------------ verifying

    def verify(self, example: Example, response: str) -> Reward:
        try:
            answer = last_tag(response, "answer")
            meta = example.meta
            roles = None if answer is None else parse_roles(answer, meta["names"], meta["terms"])
            correct = roles is not None and roles == [bool(r) for r in meta["solution"]]
            if self.cfg.reward == "logic_rl":
                return self._logic_rl(response, roles, correct)
            components = {"correct": float(correct)}
            score = float(correct)
            if self.cfg.format_reward:
                well_formed = float(answer is not None and "</think>" in response)
                components["format"] = well_formed
                score += self.cfg.format_reward * well_formed
            return Reward(score, components)
        except Exception:  # a verifier never raises on model output
            return Reward(0.0, {"correct": 0.0})

    @staticmethod
    def _logic_rl(response: str, roles: list[bool] | None, correct: bool) -> Reward:
        """Logic-RL (Xie et al., 2025, arXiv 2502.14768): format ±1; answer +2 / −1.5 / −2.

        As in Logic-RL, the answer is scored only when the format is right (else it adds 0).
        """
        format_ok = logic_rl_format_ok(response)
        format_score = 1.0 if format_ok else -1.0
        if not format_ok:
            answer_score = 0.0
        elif roles is None:
            answer_score = -2.0
        else:
            answer_score = 2.0 if correct else -1.5
        components = {"format": format_score, "answer": answer_score, "correct": float(correct)}
        return Reward(format_score + answer_score, components)

    def demonstration(self, example: Example) -> list[tuple[str, bool]]:
        """The gold answer; with task.demo_slip, that share of demonstrations stops after the first
        person's role (the others missing: scored 0)."""
        answer = example.answer
        if demo_slips(example, self.cfg.demo_slip):
            meta = example.meta
            answer = render_solution(meta["names"][:1], meta["solution"][:1], meta["terms"])
        return [(f"{DEMO_THINK}<answer>{answer}</answer>", True)]
