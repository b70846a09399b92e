"""Tasks by name. Each module owns its data, prompt template, verifier and demonstrations."""

from __future__ import annotations

import dataclasses
from importlib import import_module

from trgrpo.config.schema import TaskConfig
from trgrpo.run.records import Example
from trgrpo.tasks.base import Task, Tool

__all__ = ["TASKS", "Task", "Tool", "make_task"]

# name → "module:Class"; modules are imported on use (tool_qa pulls in bm25s, math pulls in math-verify).
TASKS = {
    "math": "trgrpo.tasks.math_qa:MathTask",
    "logic": "trgrpo.tasks.logic:LogicTask",
    "tool_qa": "trgrpo.tasks.tool_qa:ToolQATask",
}


def make_task(cfg: TaskConfig) -> Task:
    """Build the task named by `cfg.name` from its config (cheap: heavy state is built lazily)."""
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task {cfg.name!r}; valid: {', '.join(sorted(TASKS))} (set task=<name>)")
    module, cls = TASKS[cfg.name].split(":")
    task = getattr(import_module(module), cls)(cfg)
    return FewShot(task, cfg) if cfg.few_shot else task


class FewShot:
    """A task whose prompts carry `task.few_shot` worked examples, in training and evaluation alike.

    `user`: "Example: <question>\nAnswer: <answer>" blocks, then "Now: <prompt>", in one user message;
    `chat`: each example as an earlier user/assistant turn of the chat template (`Example.context`).
    Everything else (verifier, tools, demonstrations) is the wrapped task's.
    """

    def __init__(self, task: Task, cfg: TaskConfig):
        self._task, self._cfg = task, cfg
        self._shots = tuple((str(s["question"]).strip(), str(s["answer"]).strip()) for s in cfg.few_shot)

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def dataset(self, split: str, size: int, seed: int):
        return [self.with_shots(ex) for ex in self._task.dataset(split, size, seed)]

    def with_shots(self, example: Example) -> Example:
        if self._cfg.few_shot_style == "chat":
            return dataclasses.replace(example, context=self._shots)
        blocks = "".join(f"Example: {q}\nAnswer: {a}\n\n" for q, a in self._shots)
        return dataclasses.replace(example, prompt=f"{blocks}Now: {example.prompt}")
