"""The task protocol: data, prompt, verifier and (for the tiny model) a demonstration per example.

A task owns its data (a generator, or a loader for a real dataset), how a response is scored, and the
tools a multi-turn task offers. It knows nothing about models, engines or the learner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from trgrpo.run.records import Example, Reward


class Tool(Protocol):
    """A tool the policy may call inside its response (multi-turn tasks)."""

    name: str
    open_tag: str  # e.g. "<search>"
    close_tag: str  # e.g. "</search>": generation stops here and the tool runs

    def __call__(self, query: str, example: Example) -> str:
        """The observation text appended after the call, e.g. "<information>…</information>".

        `example` tells the tool which world or corpus the question lives in. Never raises: errors
        become text the policy can read.
        """
        ...


class Task(Protocol):
    name: str
    tools: Mapping[str, Tool]  # empty for single-turn tasks
    stop: tuple[str, ...]  # stop strings that end a response (e.g. "</answer>"), besides EOS

    def dataset(self, split: str, size: int, seed: int) -> Sequence[Example]:
        """`size` examples of `split` ("train" or "test"); train and test never share items."""
        ...

    def verify(self, example: Example, response: str) -> Reward:
        """Score the response text only (never the prompt). Never raises."""
        ...

    def demonstration(self, example: Example) -> list[tuple[str, bool]]:
        """A correct response in the expected format, as (text, trainable) segments.

        The tiny model's warm start trains on it. Single-turn tasks return one trainable segment;
        multi-turn tasks interleave the policy's text (True) with tool observations (False), which
        get no loss, exactly as in RL.
        """
        ...
