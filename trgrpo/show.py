"""`trgrpo show`: a few test examples of a task, their demonstrations, and the verifier's verdicts.

A quick look at a task before spending compute on it, and a check that it is wired right: the
demonstration of every shown example must score 1.0 and an empty response 0.0 (otherwise the command
exits 1). It builds the task and a handful of test examples through the Task protocol only; it loads
no model, so prompts are shown as the user message, before any chat template.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from trgrpo.config.schema import Config, ConfigError
from trgrpo.run.records import Example, Reward
from trgrpo.tasks import TASKS, Task, make_task

SHOW_COUNT = 5  # examples shown (fewer when eval.size is smaller)


@dataclass(frozen=True)
class Checked:
    """One example with its demonstration and the verifier's verdicts on it and on an empty response."""

    example: Example
    segments: tuple[tuple[str, bool], ...]  # (text, trainable): False for tool output
    demonstration: Reward
    empty: Reward

    @property
    def ok(self) -> bool:
        return self.demonstration.score == 1.0 and self.empty.score == 0.0


def check_examples(task: Task, examples: Sequence[Example]) -> list[Checked]:
    """Verify each example's demonstration (all segments, tool output included, as the verifier sees
    a rollout's text) and an empty response."""
    out = []
    for ex in examples:
        segments = tuple(task.demonstration(ex))
        text = "".join(part for part, _ in segments)
        out.append(Checked(ex, segments, task.verify(ex, text), task.verify(ex, "")))
    return out


def _field(console: Console, label: str, body: Text | str) -> None:
    line = Text(f"{label}: ", style="bold green")
    line.append_text(body if isinstance(body, Text) else Text(body))
    console.print(line)


def _verdict(reward: Reward, expected: float) -> Text:
    parts = ", ".join(f"{k}={v:g}" for k, v in reward.components.items())
    text = Text(f"{reward.score:g}" + (f" ({parts})" if parts else "") + " ")
    if reward.score == expected:
        text.append("ok", style="bold green")
    else:
        text.append(f"WRONG: expected {expected:g}", style="bold red")
    return text


def _print_checked(console: Console, item: Checked, index: int, total: int) -> None:
    ex = item.example
    console.rule(Text(f"example {index}/{total}  id={ex.id}  level={ex.level or '-'}"))
    _field(console, "prompt", ex.prompt)
    _field(console, "answer", ex.answer)
    demo = Text()
    for part, trainable in item.segments:
        demo.append(part, style="" if trainable else "dim")
    if not all(trainable for _, trainable in item.segments):
        demo.append("\n(dim: tool output, no loss)", style="italic")
    _field(console, "demonstration", demo)
    _field(console, "verify(demonstration)", _verdict(item.demonstration, 1.0))
    _field(console, "verify(empty response)", _verdict(item.empty, 0.0))


def show_task(cfg: Config, console: Console | None = None) -> None:
    """Print min(SHOW_COUNT, eval.size) test examples of cfg.task; exit 1 if a verdict is wrong."""
    if cfg.task.name not in TASKS:
        raise ConfigError(
            f"task.name={cfg.task.name!r} is not valid; choose one of: {', '.join(sorted(TASKS))}"
        )
    task = make_task(cfg.task)
    examples = list(task.dataset("test", max(1, min(SHOW_COUNT, cfg.eval.size)), cfg.task.data_seed))
    console = console or Console(highlight=False)
    console.rule(Text(f"trgrpo show: task={task.name}"))
    _field(console, "split", f"test (task.data_seed={cfg.task.data_seed}), {len(examples)} example(s)")
    tools = ", ".join(f"{name} ({tool.open_tag}…{tool.close_tag})" for name, tool in task.tools.items())
    _field(console, "tools", tools or "none (single-turn)")
    _field(console, "stop strings", ", ".join(map(repr, task.stop)) or "none (EOS only)")
    if not examples:
        print(f"trgrpo show: error: task={task.name} has no test examples", file=sys.stderr)
        sys.exit(1)
    checked = check_examples(task, examples)
    for i, item in enumerate(checked, 1):
        _print_checked(console, item, i, len(checked))
    bad = [item.example.id for item in checked if not item.ok]
    if bad:
        print(
            f"trgrpo show: error: task={task.name}: wrong verdicts for {', '.join(bad)} (a demonstration must "
            "score 1.0 and an empty response 0.0): the task's verifier or demonstration is broken",
            file=sys.stderr,
        )
        sys.exit(1)
    console.print(
        Text(f"all {len(checked)} demonstrations score 1.0, empty responses 0.0", style="bold green")
    )
