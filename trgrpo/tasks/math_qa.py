"""math: arithmetic from reasoning-gym's generators offline, or GSM8K / MATH-500 / AIME / AMC via `datasets`.

The answer is the last `\\boxed{}` of the response. Integers are compared exactly (the fast path);
everything else goes to math-verify, which handles fractions, decimals, percent and LaTeX. This module
does not time anything out itself: the verifier pool runs `verify` under a hard per-sample timeout.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Sequence

from trgrpo.config.schema import DEMO_STYLES, ConfigError, MathTaskConfig
from trgrpo.run.records import Example, Reward
from trgrpo.tasks.answer import last_boxed
from trgrpo.tasks.data import check_demo_slip, demo_slips, load_records

TEST_SEED_OFFSET = 1_000_003
WARMSTART_EXAMPLES = 16384  # = trgrpo.models.tiny.WARMSTART_EXAMPLES (not imported: models pulls in torch)  # test data comes from seeds disjoint from any training seed
_INT = re.compile(r"^[+-]?\d+$")
_SUM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")


def column_work(expression: str, *, forget_carries: bool = False) -> tuple[str, str] | None:
    """A two-term addition worked column by column from the units, each carry written, and its answer.

    "47 + 38" -> ("7 + 8 = 15, 4 + 3 + 1 = 8.", "85"): every step is a one-digit sum, a table of 200
    entries that a few hundred examples cover, so a tiny model that learns the steps can add numbers it
    never saw; the answer is the last column's sum followed by the earlier columns' units digits.
    `forget_carries` writes every carry as 0, the classic slip: ("7 + 8 = 15, 4 + 3 + 0 = 7.", "75").
    None for anything but a two-term addition.
    """
    match = _SUM.match(expression or "")
    if match is None:
        return None
    a, b = match.groups()
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    steps, units, carry = [], [], None
    for x, y in zip(reversed(a), reversed(b), strict=True):
        total = int(x) + int(y) + (carry or 0)
        steps.append(f"{x} + {y} = {total}" if carry is None else f"{x} + {y} + {carry} = {total}")
        units.append(str(total % 10))
        carry = 0 if forget_carries else total // 10
    answer = str(total) + "".join(reversed(units[:-1]))
    return ", ".join(steps) + ".", answer


def _as_int(text: str) -> int | None:
    cleaned = text.replace(",", "").replace("\\!", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.removeprefix("\\text{").removesuffix("}") if cleaned.startswith("\\text{") else cleaned
    if _INT.match(cleaned) and len(cleaned) <= 400:
        return int(cleaned)
    return None


def gold_from(raw: str, answer_format: str) -> str:
    """The gold answer of a real-data record: raw, GSM8K's text after '####', or a solution's \\boxed{}."""
    if answer_format == "gsm8k":
        return raw.split("####")[-1].strip().replace(",", "")
    if answer_format == "boxed":
        return last_boxed(raw) or raw.strip()
    return str(raw).strip()


class MathTask:
    name = "math"
    tools: dict = {}  # noqa: RUF012 - single-turn
    stop: tuple[str, ...] = ()

    def __init__(self, cfg: MathTaskConfig):
        if cfg.reward != "binary":
            raise ConfigError(f"task.reward={cfg.reward!r} is not valid for math; choose one of: binary")
        if cfg.demo_style not in DEMO_STYLES:
            raise ConfigError(f"task.demo_style={cfg.demo_style!r}: choose one of {', '.join(DEMO_STYLES)}")
        check_demo_slip(cfg.demo_slip)
        if cfg.demo_slip > 0 and cfg.demo_style != "columns":
            raise ConfigError("task.demo_slip forgets carries in worked columns: set task.demo_style=columns")
        if cfg.dataset is None and not cfg.generators:
            raise ConfigError("task=math needs task.generators (offline) or task.dataset (a hub id or path)")
        self.cfg = cfg

    # ----------------------------------------------------------------------------------------- data

    def dataset(self, split: str, size: int, seed: int) -> Sequence[Example]:
        if self.cfg.dataset is not None:
            return self._real(split, size, seed)
        if split != "test":
            return self._generated(split, size, seed)
        # Never evaluate on a question the training split contains (small arithmetic spaces repeat).
        # The tiny model's warm start reads the first WARMSTART_EXAMPLES of the same training stream.
        seen = {
            ex.prompt for ex in self._generated("train", max(self.cfg.train_size, WARMSTART_EXAMPLES), seed)
        }
        items: list[Example] = []
        for factor in (2, 8, 32):
            items = [ex for ex in self._generated(split, factor * size + 64, seed) if ex.prompt not in seen]
            if len(items) >= size:
                break
        return items[:size]

    def _generated(self, split: str, size: int, seed: int) -> list[Example]:
        import reasoning_gym

        base = seed + (TEST_SEED_OFFSET if split == "test" else 0)
        total = sum(g.weight for g in self.cfg.generators)
        pools = []
        for k, gen in enumerate(self.cfg.generators):
            n = max(1, math.ceil(size * gen.weight / total))
            try:
                data = reasoning_gym.create_dataset(gen.name, size=n, seed=base + 7919 * k, **gen.params)
            except (KeyError, ValueError, TypeError, AssertionError) as err:
                raise ConfigError(f"task.generators[{k}] ({gen.name} {gen.params}): {err}") from err
            pools.append([(gen.name, item) for item in data])
        mixed = [x for pool in pools for x in pool]
        random.Random(base).shuffle(mixed)
        return [self._example(f"{split}-{i}", name, item) for i, (name, item) in enumerate(mixed[:size])]

    def _example(self, uid: str, generator: str, item: dict) -> Example:
        meta = item.get("metadata", {})
        difficulty = meta.get("difficulty", {})
        level = generator + "".join(
            f":{k}={v}" for k, v in sorted(difficulty.items()) if not isinstance(v, tuple)
        )
        if "num_digits" in meta:
            level = f"{generator}:digits={meta['num_digits']}"
        prompt = _with_suffix(item["question"], self.cfg.prompt_suffix)
        return Example(uid, prompt, str(item["answer"]), level, {"expression": meta.get("expression")})

    def _real(self, split: str, size: int, seed: int) -> list[Example]:
        cfg = self.cfg
        name = cfg.train_split if split == "train" else cfg.test_split
        rows = load_records(cfg.dataset, name, config=cfg.dataset_config, what="task.dataset")
        for field_name in (cfg.question_field, cfg.answer_field):
            if rows and field_name not in rows[0]:
                raise ConfigError(
                    f"task.dataset {cfg.dataset!r} has no column {field_name!r} (columns: {sorted(rows[0])}); "
                    "set task.question_field / task.answer_field"
                )
        order = list(range(len(rows)))
        if split == "train":
            random.Random(seed).shuffle(order)
        out = []
        for i in order[:size]:
            row = rows[i]
            gold = gold_from(str(row[cfg.answer_field]), cfg.answer_format)
            level = str(row.get("level", row.get("difficulty", "")))
            out.append(
                Example(f"{split}-{i}", _with_suffix(row[cfg.question_field], cfg.prompt_suffix), gold, level)
            )
        return out

    # ------------------------------------------------------------------------------------ verifying

    def verify(self, example: Example, response: str) -> Reward:
        predicted = last_boxed(response)
        if predicted is None or not predicted.strip():  # an empty box is no answer (and earns no bonus)
            return Reward(0.0, {"correct": 0.0, "format": 0.0})
        gold_int, pred_int = _as_int(example.answer), _as_int(predicted)
        if gold_int is not None and pred_int is not None:
            correct, parsable = gold_int == pred_int, True
        else:
            correct = _math_verify(example.answer, predicted)
            parsable = correct or any(c.isdigit() for c in predicted)
        # `format`: a boxed answer with a digit in it (math-verify reads any word as a product of symbols);
        # task.format_reward turns it into shaping (0 = off). The bonus does not need the answer to be
        # right, but it needs one: `\boxed{}` or `\boxed{the}` earn nothing.
        score = float(correct) + self.cfg.format_reward * parsable
        return Reward(score, {"correct": float(correct), "format": float(parsable)})

    def demonstration(self, example: Example) -> list[tuple[str, bool]]:
        expression, answer = example.meta.get("expression"), example.answer
        columns = None
        if self.cfg.demo_style == "columns":
            columns = column_work(expression, forget_carries=demo_slips(example, self.cfg.demo_slip))
        if columns is not None:
            work, answer = columns
            work += " "
        else:
            work = f"{expression} = {answer}. " if expression else ""
        return [(f"{work}The answer is \\boxed{{{answer}}}.", True)]


def _with_suffix(question: str, suffix: str) -> str:
    return f"{question.strip()} {suffix}".strip()


def _math_verify(gold: str, predicted: str) -> bool:
    """math-verify equivalence; its own signal-based timeout works only in a main thread."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # a verifier never raises on model output
        return False
