"""Plain records that cross module boundaries: what engines return and what tasks score.

Engines produce `Completion`s, tasks produce `Reward`s, the loop pairs them into `Rollout`s, and the
learner turns rollouts into tensors (learner/batch.py). Nothing here knows about models or configs.
Notation: N prompts, G samples per prompt (group size), B = N·G response rows, T response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """How an engine samples. `n` completions per prompt, returned prompt-major."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64  # per call; the agent loop also bounds the whole response
    n: int = 1  # samples per prompt (the group size G for training)
    stop: tuple[str, ...] = ()  # stop strings; the stop string is kept in the output
    seed: int | None = None  # engine seed for this call (reproducible sampling)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Completion:
    """One sampled response to one prompt, as token ids (never re-tokenised text).

    `token_ids`, `logprobs` and `response_mask` have the same length T. For multi-turn tool use the
    ids include the tool observations, which are False in `response_mask` (no loss) and carry
    logprob 0.0. `logprobs` are the sampler's log-probs of the sampled ids under the full-vocabulary
    softmax of logits / temperature (ALGORITHMS.md, "Log-probs").
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    response_mask: tuple[bool, ...]
    text: str  # decoded response (all turns, observations included)
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "max_turns"
    info: Mapping[str, Any] = field(default_factory=dict)  # e.g. turns, tool calls (agent loop)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.logprobs) != n or len(self.response_mask) != n:
            raise ValueError(
                f"Completion fields disagree: {n} token_ids, {len(self.logprobs)} logprobs, "
                f"{len(self.response_mask)} response_mask entries"
            )


@dataclass(frozen=True)
class Example:
    """One task item. `prompt` is the user message; the runner applies the model's chat template."""

    id: str
    prompt: str
    answer: str  # gold answer in the form a reader checks (also what `trgrpo show` prints)
    level: str = ""  # difficulty label, for per-level evaluation breakdowns
    meta: Mapping[str, Any] = field(default_factory=dict)  # what the verifier needs beyond `answer`
    context: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) chat turns: few-shot examples


@dataclass(frozen=True)
class Reward:
    """A verifier's verdict. `score` is what training uses; `components` are logged as reward/<k>."""

    score: float
    components: Mapping[str, float] = field(default_factory=dict)
    unscorable: bool = False  # the verifier timed out or crashed: scored 0 and counted


@dataclass(frozen=True)
class Rollout:
    """A prompt's token ids, one completion of it, and its reward: the learner's unit of data."""

    example: Example
    prompt_ids: tuple[int, ...]
    completion: Completion
    reward: Reward
