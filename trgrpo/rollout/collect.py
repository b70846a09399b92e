"""Sample completions for a list of examples and score them: the rollout phase shared by training and
evaluation. Multi-turn tasks (those with tools) go through the agent loop; others straight to the
engine. Rewards come from the verifier pool, then the task-independent shaping: an overlong penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from trgrpo.config.schema import ConfigError, TaskConfig
from trgrpo.rollout.base import Engine
from trgrpo.run.records import Example, Reward, Rollout, Sampling
from trgrpo.tasks.base import Task
from trgrpo.tasks.verify_pool import VerifyPool


def encode_prompts(
    tokenizer, examples: Sequence[Example], *, limit: int, max_new_tokens: int
) -> list[list[int]]:
    from trgrpo.models.chat import encode_prompt

    prompts = [encode_prompt(tokenizer, ex.prompt, ex.context) for ex in examples]
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > limit:
        raise ConfigError(
            f"a prompt of {longest} tokens + rollout.max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of {limit} tokens; lower rollout.max_new_tokens or pick shorter task settings (or raise model.max_context)"
        )
    return prompts


def sample_and_score(
    engine: Engine,
    task: Task,
    pool: VerifyPool,
    tokenizer,
    examples: Sequence[Example],
    sampling: Sampling,
    task_cfg: TaskConfig,
    *,
    limit: int,
) -> list[Rollout]:
    """sampling.n rollouts per example, example-major, each with its reward."""
    prompts = encode_prompts(tokenizer, examples, limit=limit, max_new_tokens=sampling.max_new_tokens)
    if task.tools:
        from trgrpo.rollout.agent import run_agent

        budget = getattr(task_cfg, "max_response_tokens", sampling.max_new_tokens)
        completions = run_agent(
            engine,
            tokenizer,
            prompts,
            list(examples),
            sampling,
            task.tools,
            max_turns=getattr(task_cfg, "max_turns", 1),
            max_response_tokens=budget,
            stop=task.stop,
        )
    else:
        completions = engine.generate(
            prompts, replace(sampling, stop=tuple(sampling.stop) + tuple(task.stop))
        )
    owners = [ex for ex in examples for _ in range(sampling.n)]
    rewards = pool.score(owners, [c.text for c in completions])
    rollouts = []
    for k, (ex, completion, reward) in enumerate(zip(owners, completions, rewards)):
        if task_cfg.overlong_penalty and completion.finish_reason == "length":
            reward = Reward(
                reward.score - task_cfg.overlong_penalty,
                {**reward.components, "overlong": -task_cfg.overlong_penalty},
                reward.unscorable,
            )
        rollouts.append(Rollout(ex, tuple(prompts[k // sampling.n]), completion, reward))
    return rollouts
