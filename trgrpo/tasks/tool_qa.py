"""tool_qa: multi-hop questions about a generated fictional wiki, answered by searching it.

The policy writes `<search>query</search>`; the agent loop (rollout/agent.py) stops there, appends the
tool's `<information>…</information>` and continues, until `<answer>…</answer>`. The reward is exact
match of the last answer after SQuAD normalisation against the gold aliases (1/0). Diagnostics that
are not reward ride along in the components under `diag_` (searches, evidence recall, turns, answer
length), so the loop logs them per step.

Offline, each group of `questions_per_world` questions lives in its own seeded world
(tool_qa_world.py); a world is rebuilt from the seed in `Example.meta` wherever it is needed and cached.
With `questions_path` and `corpus_path` the same tool searches a real corpus (Search-R1's NQ/HotpotQA
files). This module does not run the loop or tokenise anything.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from trgrpo.config.schema import ConfigError, ToolQATaskConfig
from trgrpo.run.records import Example, Reward
from trgrpo.tasks.answer import last_tag, normalize_text
from trgrpo.tasks.calc import CalcTool
from trgrpo.tasks.data import check_demo_slip, demo_slips
from trgrpo.tasks.tool_qa_search import Bm25Index, SearchTool
from trgrpo.tasks.tool_qa_world import World, build_world, lookup_question, numeric_question, world_seed

PROMPT = (
    "Answer the question. To look something up, write <search>query</search>; results come back in "
    "<information> </information>. {calc}Give the final answer as <answer>answer</answer>.\n"
    "Question: {question}"
)
CALC_HINT = "To compute, write <calc>expression</calc>. "


def _split_of(text: str) -> str:
    """The split of a real-data question when its file holds both (stable hash of the question)."""
    return "test" if hashlib.sha256(text.encode()).digest()[0] % 2 else "train"


@lru_cache(maxsize=128)
def _world_index(seed: int, split: str, people: int, companies: int, cities: int) -> Bm25Index:
    return Bm25Index(build_world(seed, split, people, companies, cities).documents())


class ToolQATask:
    """Search-augmented multi-hop QA over a generated wiki (or a real corpus)."""

    name = "tool_qa"
    stop: tuple[str, ...] = ("</answer>",)

    def __init__(self, cfg: ToolQATaskConfig):
        if cfg.reward != "binary":
            raise ConfigError(f"task.reward={cfg.reward!r} is not valid for tool_qa; choose one of: binary")
        if not 1 <= cfg.min_hops <= cfg.max_hops:
            raise ConfigError(
                f"task.min_hops={cfg.min_hops}, task.max_hops={cfg.max_hops}: need 1 ≤ min ≤ max"
            )
        check_demo_slip(cfg.demo_slip)
        if (cfg.questions_path is None) != (cfg.corpus_path is None):
            raise ConfigError("real data needs both task.questions_path and task.corpus_path (or neither)")
        self.cfg = cfg
        self.tools: dict[str, Any] = {"search": SearchTool(cfg.top_k, self._index)}
        if cfg.calc:
            self.tools["calc"] = CalcTool()
        self._corpus: Bm25Index | None = None

    def world(self, example: Example) -> World:
        """The generated world an offline example lives in."""
        cfg = self.cfg
        meta = example.meta
        return build_world(
            meta["world_seed"], meta["split"], cfg.world_people, cfg.world_companies, cfg.world_cities
        )

    def _index(self, example: Example) -> Bm25Index:
        if example.meta.get("world_seed") is None:
            if self._corpus is None:
                self._corpus = Bm25Index(self._load_corpus())
            return self._corpus
        cfg = self.cfg
        meta = example.meta
        return _world_index(
            meta["world_seed"], meta["split"], cfg.world_people, cfg.world_companies, cfg.world_cities
        )

    # ----------------------------------------------------------------------------------------- data

    def dataset(self, split: str, size: int, seed: int) -> Sequence[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if self.cfg.questions_path is not None:
            return self._real(split, size, seed)
        examples: list[Example] = []
        world = 0
        while len(examples) < size:
            count = min(self.cfg.questions_per_world, size - len(examples))
            batch = self._world_questions(split, seed, world, count, first=len(examples))
            if not batch:
                raise ConfigError(
                    f"no {self.cfg.min_hops}–{self.cfg.max_hops}-hop question fits a world this small; "
                    "raise task.world_people/world_companies/world_cities or lower task.max_hops"
                )
            examples += batch
            world += 1
        return examples

    def _world_questions(self, split: str, seed: int, index: int, count: int, first: int) -> list[Example]:
        cfg = self.cfg
        wseed = world_seed(seed, split, index)
        world = build_world(wseed, split, cfg.world_people, cfg.world_companies, cfg.world_cities)
        rng = random.Random(wseed + 1)
        examples: list[Example] = []
        seen: set[str] = set()
        for _ in range(50 * count):
            if len(examples) == count:
                break
            hops = rng.randint(cfg.min_hops, cfg.max_hops)
            numeric = cfg.calc and rng.random() < cfg.calc_share
            question = (numeric_question if numeric else lookup_question)(world, rng, hops)
            if question is None or question.text in seen:
                continue
            seen.add(question.text)
            meta = {
                "world_seed": wseed,
                "split": split,
                "evidence": question.evidence,
                "relations": question.relations,
                "aliases": [question.answer],
                "calc_expression": question.calc_expression,
            }
            prompt = PROMPT.format(calc=CALC_HINT if cfg.calc else "", question=question.text)
            level = f"hops={len(question.evidence)}" + (",calc" if numeric else "")
            uid = f"tool_qa-{split}-{seed}-{first + len(examples)}"
            examples.append(Example(uid, prompt, question.answer, level, meta))
        return examples

    def _real(self, split: str, size: int, seed: int) -> list[Example]:
        """Search-R1-style questions: {"question", "golden_answers" | "answers" | "answer"}.

        A `{split}` in questions_path names one file per split; otherwise one file is split by hash.
        """
        from trgrpo.tasks.data import load_records

        path = self.cfg.questions_path
        rows = load_records(path.replace("{split}", split), split, what="task.questions_path")
        if "{split}" not in path:
            rows = [row for row in rows if _split_of(str(row.get("question", ""))) == split]
        random.Random(seed).shuffle(rows)
        examples = []
        for i, row in enumerate(rows[:size]):
            answers = row.get("golden_answers") or row.get("answers") or row.get("answer")
            aliases = [answers] if isinstance(answers, str) else [str(a) for a in answers or []]
            if "question" not in row or not aliases:
                raise ConfigError(
                    f"task.questions_path={path!r}: rows need 'question' and answers (got {sorted(row)})"
                )
            question = str(row["question"]).strip()
            prompt = PROMPT.format(calc=CALC_HINT if self.cfg.calc else "", question=question)
            meta = {"world_seed": None, "aliases": aliases, "question": question, "evidence": []}
            examples.append(Example(f"tool_qa-{split}-{seed}-{i}", prompt, aliases[0], "real", meta))
        return examples

    def _load_corpus(self) -> list[tuple[str, str]]:
        """{"title", "text"} rows, or Search-R1's {"contents": '"Title"\\ntext'}."""
        from trgrpo.tasks.data import load_records

        documents = []
        for row in load_records(self.cfg.corpus_path, "train", what="task.corpus_path"):
            if row.get("contents") and not row.get("text"):  # columns missing from a row load as None
                title, _, text = str(row["contents"]).partition("\n")
                documents.append((title.strip().strip('"'), text.strip()))
            else:
                documents.append((str(row.get("title") or ""), str(row.get("text") or "")))
        return documents

    # ------------------------------------------------------------------------------------ verifying

    def verify(self, example: Example, response: str) -> Reward:
        try:
            predicted = last_tag(response, "answer")
            golds = {normalize_text(str(a)) for a in example.meta["aliases"]} - {""}
            guess = normalize_text(predicted) if predicted is not None else ""
            correct = float(bool(guess) and guess in golds)
            components = {"correct": correct, **self._diagnostics(example, response, predicted)}
            score = correct
            if self.cfg.format_reward:
                components["format"] = float(predicted is not None)
                score += self.cfg.format_reward * components["format"]
            return Reward(score, components)
        except Exception:  # a verifier never raises on model output
            return Reward(0.0, {"correct": 0.0})

    def _diagnostics(self, example: Example, response: str, predicted: str | None) -> dict[str, float]:
        """Counts about the trajectory (not reward): tool calls, turns, evidence seen, answer length."""
        calls = {name: response.count(tool.close_tag) for name, tool in self.tools.items()}
        diag = {
            "diag_searches": float(calls["search"]),
            "diag_turns": float(sum(calls.values()) + 1),
            "diag_answer_words": float(len(predicted.split())) if predicted is not None else 0.0,
        }
        if "calc" in calls:
            diag["diag_calcs"] = float(calls["calc"])
        evidence = example.meta.get("evidence") or []
        if evidence:
            diag["diag_evidence_recall"] = sum(f"(Title: {t})" in response for t in evidence) / len(evidence)
        return diag

    def demonstration(self, example: Example) -> list[tuple[str, bool]]:
        """Search each hop's document by its title, compute if needed, answer; observations untrained.
        With task.demo_slip, that share of multi-hop demonstrations stops after the first search and
        answers the entity found there (the second hop's title): a wrong answer.

        A space follows `<search>` and `<answer>` (the tool and the verifier strip it): a name copied
        from the question or a document then tokenises exactly as it did there (" Baifi", not "Baifi"),
        so a byte-level BPE model copies it token by token instead of re-spelling its first word.
        """
        meta = example.meta
        queries = meta.get("evidence") or [meta.get("question", "")]
        expression, answer = meta.get("calc_expression"), example.answer
        if len(queries) > 1 and demo_slips(example, self.cfg.demo_slip):  # answers what it found first
            queries, expression, answer = queries[:1], None, queries[1]
        segments: list[tuple[str, bool]] = []
        for query in queries:
            segments.append((f"<search> {query}</search>", True))
            segments.append((self.tools["search"](query, example), False))
        if expression and "calc" in self.tools:
            segments.append((f"<calc>{expression}</calc>", True))
            segments.append((self.tools["calc"](expression, example), False))
        segments.append((f"<answer> {answer}</answer>", True))
        return segments
