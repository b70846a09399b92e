"""Tasks by name. Each module owns its data, prompt template, verifier and demonstrations."""

from __future__ import annotations

from importlib import import_module

from trgrpo.config import TaskConfig
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
    return getattr(import_module(module), cls)(cfg)
