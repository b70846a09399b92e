"""The multi-turn tool loop shared by every engine: generate, run the called tool, append, continue.

A turn ends at a tool's close tag (a stop string); the tool's observation is tokenised on its own and
appended with `response_mask` False and logprob 0.0, and the next turn continues from the prompt plus
every id so far, so the learner later scores exactly the ids the engine sampled (generated text is
never re-tokenised). All rows that continue are batched into one `engine.generate` call per turn.

Budgets: `max_turns` is the number of tool calls a response may make; a response that calls a tool
once more ends there with finish_reason "max_turns". `max_response_tokens` bounds the whole response
(generated and observation ids); a response that would exceed it is cut with finish_reason "length".
This module knows nothing about tasks or rewards, and it does not apply chat templates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from trgrpo.rollout.base import Engine
from trgrpo.run.records import Completion, Example, Sampling
from trgrpo.tasks.base import Tool


@dataclass
class _Row:
    """One response being built across turns (mutable while the loop runs)."""

    prompt: int  # index into prompts/examples
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    response_mask: list[bool] = field(default_factory=list)
    turns: int = 0
    tool_calls: Counter = field(default_factory=Counter)
    finish_reason: str = "stop"

    def extend(self, completion: Completion, budget: int) -> None:
        """Append one turn's generated ids, cut to the response budget."""
        room = budget - len(self.token_ids)
        self.token_ids += completion.token_ids[:room]
        self.logprobs += completion.logprobs[:room]
        self.response_mask += completion.response_mask[:room]
        self.turns += 1
        self.finish_reason = "length" if len(completion.token_ids) > room else completion.finish_reason


def _called_tool(text: str, tools: Mapping[str, Tool]) -> tuple[Tool, str] | None:
    """The tool whose close tag ends `text`, and the query: the text between the last open tag and that
    close tag (all of the turn's text before the close tag when the open tag is missing)."""
    stripped = text.rstrip()
    for tool in tools.values():
        if stripped.endswith(tool.close_tag):
            body = stripped[: -len(tool.close_tag)]
            start = body.rfind(tool.open_tag)
            return tool, body[start + len(tool.open_tag) :] if start >= 0 else body
    return None


def _observe(tool: Tool, query: str, example: Example) -> str:
    try:
        return tool(query, example)
    except Exception as err:  # tools should not raise; if one does, the policy reads the error
        return f"error: {type(err).__name__}: {err}"


def _step_tools(
    rows: list[_Row],
    texts: list[str],
    examples: list[Example],
    tools: Mapping[str, Tool],
    tokenizer: Any,
    max_turns: int,
    max_response_tokens: int,
) -> list[_Row]:
    """Run the tool each row called in its latest turn; return the rows that generate another turn."""
    continuing = []
    for row, text in zip(rows, texts):
        called = None if row.finish_reason == "length" else _called_tool(text, tools)
        if called is None:
            continue
        tool, query = called
        if sum(row.tool_calls.values()) >= max_turns:
            row.finish_reason = "max_turns"
            continue
        row.tool_calls[tool.name] += 1
        observation = tokenizer.encode(_observe(tool, query, examples[row.prompt]), add_special_tokens=False)
        if len(row.token_ids) + len(observation) >= max_response_tokens:
            row.finish_reason = "length"  # no room to read the observation and answer after it
            continue
        row.token_ids += observation
        row.logprobs += [0.0] * len(observation)
        row.response_mask += [False] * len(observation)
        continuing.append(row)
    return continuing


def _finish(row: _Row, tokenizer: Any) -> Completion:
    return Completion(
        token_ids=tuple(row.token_ids),
        logprobs=tuple(row.logprobs),
        response_mask=tuple(row.response_mask),
        text=tokenizer.decode(row.token_ids, skip_special_tokens=True),
        finish_reason=row.finish_reason,
        info={"turns": row.turns, "tool_calls": dict(row.tool_calls)},
    )


def run_agent(
    engine: Engine,
    tokenizer: Any,
    prompts: list[list[int]],
    examples: list[Example],
    sampling: Sampling,
    tools: Mapping[str, Tool],
    *,
    max_turns: int,
    max_response_tokens: int,
    stop: tuple[str, ...] = (),
) -> list[Completion]:
    """`sampling.n` multi-turn completions per prompt, prompt-major (the contract of Engine.generate).

    `stop` ends a response (e.g. "</answer>"); the tools' close tags end a turn. `tokenizer` needs
    `encode(text, add_special_tokens=False)` and `decode(ids, skip_special_tokens=True)`.
    """
    assert len(prompts) == len(examples), f"{len(prompts)} prompts but {len(examples)} examples"
    assert max_response_tokens > 0, f"max_response_tokens must be positive, got {max_response_tokens}"
    stops = tuple(dict.fromkeys((*sampling.stop, *stop, *(tool.close_tag for tool in tools.values()))))
    first = replace(sampling, stop=stops, max_new_tokens=min(sampling.max_new_tokens, max_response_tokens))
    rows = [_Row(prompt=i // sampling.n) for i in range(len(prompts) * sampling.n)]
    active, completions = rows, engine.generate(prompts, first)
    assert len(completions) == len(rows), f"engine returned {len(completions)} completions for {len(rows)}"
    turn = 0
    while True:
        for row, completion in zip(active, completions):
            row.extend(completion, max_response_tokens)
        texts = [completion.text for completion in completions]
        active = _step_tools(active, texts, examples, tools, tokenizer, max_turns, max_response_tokens)
        if not active:
            break
        turn += 1
        # One call per turn, sized for the row with the most room; `extend` cuts each row to its own.
        room = max(max_response_tokens - len(row.token_ids) for row in active)
        sampling_turn = replace(
            first,
            n=1,
            max_new_tokens=min(sampling.max_new_tokens, room),
            seed=None if sampling.seed is None else sampling.seed + turn,
        )
        completions = engine.generate([prompts[row.prompt] + row.token_ids for row in active], sampling_turn)
        assert len(completions) == len(active), (
            f"engine returned {len(completions)} for {len(active)} prompts"
        )
    return [_finish(row, tokenizer) for row in rows]
