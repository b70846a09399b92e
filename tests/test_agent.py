"""The multi-turn agent loop, driven by a scripted engine over a byte-level tokenizer (no downloads)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trgrpo.rollout.agent import run_agent
from trgrpo.run.records import Completion, Example, Sampling

Plan = Callable[[int, int, int], str]  # (prompt index, sample index, turn) → the text generated that turn


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class ScriptedEngine:
    """Generates the plan's text for the row and turn it reads off the context; records every call.

    Each row's first turn starts with "#p<i>s<j>" so later turns (called with n=1) know their row; the
    turn is the number of observations in the context. Stop strings and max_new_tokens are honoured
    like a real engine, and logprobs are unique per call and position so their order can be checked.
    """

    def __init__(self, tokenizer, plan: Plan):
        self.tokenizer, self.plan = tokenizer, plan
        self.calls: list[tuple[list[list[int]], Sampling, list[Completion]]] = []

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        out = []
        for ids in prompts:
            context = self.tokenizer.decode(ids)
            for j in range(sampling.n):
                row = re.search(r"#p(\d+)s(\d+)", context)
                p, s = (int(row.group(1)), int(row.group(2))) if row else (int(context[1:].split(":")[0]), j)
                text = (f"#p{p}s{s} " if row is None else "") + self.plan(
                    p, s, context.count("<information>")
                )
                out.append(self._complete(text, sampling, len(self.calls)))
        self.calls.append((prompts, sampling, out))
        return out

    def _complete(self, text: str, sampling: Sampling, call: int) -> Completion:
        ends = [text.find(stop) + len(stop) for stop in sampling.stop if stop in text]
        text = text[: min(ends)] if ends else text
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        finish = "length" if len(ids) > sampling.max_new_tokens else "stop"
        ids = ids[: sampling.max_new_tokens]
        logprobs = tuple(-(call + 1) - t / 1000 for t in range(len(ids)))
        return Completion(tuple(ids), logprobs, (True,) * len(ids), self.tokenizer.decode(ids), finish)


class EchoSearch:
    name = "search"
    open_tag = "<search>"
    close_tag = "</search>"

    def __init__(self):
        self.queries: list[tuple[str, str]] = []

    def __call__(self, query: str, example: Example) -> str:
        self.queries.append((query, example.id))
        return f"\n<information>{query.upper()} for {example.id}</information>\n"


def _run(tokenizer, plan: Plan, prompts: int = 1, n: int = 1, max_turns: int = 4, budget: int = 400, **kw):
    engine, tool = ScriptedEngine(tokenizer, plan), EchoSearch()
    prompt_ids = [tokenizer.encode(f"P{i}: question {i}?", add_special_tokens=False) for i in range(prompts)]
    examples = [Example(f"ex{i}", f"question {i}?", "A") for i in range(prompts)]
    sampling = Sampling(max_new_tokens=kw.pop("max_new_tokens", 64), n=n, seed=kw.pop("seed", None))
    completions = run_agent(
        engine,
        tokenizer,
        prompt_ids,
        examples,
        sampling,
        {"search": tool},
        max_turns=max_turns,
        max_response_tokens=budget,
        stop=("</answer>",),
    )
    return completions, engine, tool, prompt_ids


def test_observation_is_masked_and_ids_are_concatenated(tokenizer) -> None:
    plan = {0: "look <search>alpha</search> ignored", 1: "so <answer>A</answer> trailing"}
    (done,), engine, tool, prompt_ids = _run(tokenizer, lambda p, s, turn: plan[turn], seed=7)
    assert len(engine.calls) == 2 and tool.queries == [("alpha", "ex0")]
    (_, first_sampling, (gen0,)), (second_prompts, second_sampling, (gen1,)) = engine.calls
    observation = tokenizer.encode("\n<information>ALPHA for ex0</information>\n", add_special_tokens=False)
    assert done.token_ids == gen0.token_ids + tuple(observation) + gen1.token_ids
    assert second_prompts == [prompt_ids[0] + list(gen0.token_ids) + observation]
    assert done.response_mask == (True,) * len(gen0.token_ids) + (False,) * len(observation) + (True,) * len(
        gen1.token_ids
    )
    assert [lp for lp, m in zip(done.logprobs, done.response_mask) if m] == [*gen0.logprobs, *gen1.logprobs]
    assert all(lp == 0.0 for lp, m in zip(done.logprobs, done.response_mask) if not m)
    assert (
        done.text
        == "#p0s0 look <search>alpha</search>\n<information>ALPHA for ex0</information>\nso <answer>A</answer>"
    )
    assert (done.finish_reason, done.info) == ("stop", {"turns": 2, "tool_calls": {"search": 1}})
    assert {"</search>", "</answer>"} <= set(first_sampling.stop) and first_sampling.n == 1
    assert (second_sampling.n, second_sampling.seed, first_sampling.seed) == (1, 8, 7)


def test_max_turns_stops_a_model_that_keeps_calling(tokenizer) -> None:
    (done,), engine, tool, _ = _run(tokenizer, lambda p, s, turn: f"<search>q{turn}</search>", max_turns=2)
    assert len(engine.calls) == 3 and [q for q, _ in tool.queries] == ["q0", "q1"]
    assert (done.finish_reason, done.info) == ("max_turns", {"turns": 3, "tool_calls": {"search": 2}})
    assert done.text.endswith("<search>q2</search>") and done.text.count("<information>") == 2


def test_prompt_major_order_with_uneven_turns(tokenizer) -> None:
    def plan(p: int, s: int, turn: int) -> str:
        searches = (p + s) % 3
        return f"<search>p{p}s{s}t{turn}</search>" if turn < searches else f"<answer>p{p}s{s}</answer>"

    completions, engine, _, _ = _run(tokenizer, plan, prompts=3, n=2)
    assert len(completions) == 6
    for i, done in enumerate(completions):
        p, s = divmod(i, 2)
        searches = (p + s) % 3
        assert done.text.startswith(f"#p{p}s{s} ") and done.text.endswith(f"<answer>p{p}s{s}</answer>")
        assert done.info == {"turns": searches + 1, "tool_calls": {"search": searches} if searches else {}}
        assert done.text.count(f" for ex{p}</information>") == searches
    # one batched call per turn, holding exactly the rows that still search
    assert [len(prompts) for prompts, _, _ in engine.calls] == [3, 4, 2]
    assert [sampling.n for _, sampling, _ in engine.calls] == [2, 1, 1]


def test_a_finished_answer_is_not_continued(tokenizer) -> None:
    (done,), engine, tool, _ = _run(tokenizer, lambda p, s, turn: "<answer>A</answer><search>more</search>")
    assert len(engine.calls) == 1 and tool.queries == []
    assert done.text.endswith("<answer>A</answer>") and all(done.response_mask)
    assert done.info == {"turns": 1, "tool_calls": {}}


def test_response_budget_cuts_generation_and_observations(tokenizer) -> None:
    long_turn = "x" * 30 + "<search>alpha</search>"
    (done,), engine, _, _ = _run(tokenizer, lambda p, s, turn: long_turn, budget=120)
    assert len(done.token_ids) <= 120 and done.finish_reason == "length"
    (_, _, (gen0,)), (prompts, sampling, _) = engine.calls
    so_far = len(prompts[0]) - len(tokenizer.encode("P0: question 0?", add_special_tokens=False))
    assert so_far > len(gen0.token_ids) and sampling.max_new_tokens == 120 - so_far == 20
    # the observation would not leave room to continue: stop before it, without appending it
    (short,), engine, _, _ = _run(tokenizer, lambda p, s, turn: "<search>alpha</search>", budget=40)
    assert (short.finish_reason, len(engine.calls), short.text) == (
        "length",
        1,
        "#p0s0 <search>alpha</search>",
    )
    assert all(short.response_mask) and short.info["tool_calls"] == {"search": 1}


def test_per_turn_token_cap_is_length(tokenizer) -> None:
    (done,), engine, _, _ = _run(tokenizer, lambda p, s, turn: "y" * 100, max_new_tokens=16)
    assert len(done.token_ids) == 16 and done.finish_reason == "length" and len(engine.calls) == 1
