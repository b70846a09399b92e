"""`trgrpo eval` and the evaluation during training: greedy accuracy, avg@n and unbiased pass@k with
95% bootstrap intervals over prompts, by difficulty level (statistics in stats.py).

A sample counts as correct when its reward's `correct` component is 1 (or, for a task without one,
when its score is ≥ 1), so shaped rewards do not blur accuracy.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trgrpo.config.schema import Config, ConfigError, TaskConfig, resolve
from trgrpo.report.stats import summarize
from trgrpo.rollout.collect import sample_and_score
from trgrpo.run.records import Example, Rollout, Sampling

log = logging.getLogger("trgrpo")


def is_correct(rollout: Rollout) -> bool:
    reward = rollout.reward
    return reward.components.get("correct", float(reward.score >= 1.0)) >= 1.0


def evaluate_examples(
    engine,
    task,
    pool,
    tokenizer,
    examples: Sequence[Example],
    task_cfg: TaskConfig,
    *,
    n: int,
    ks: Sequence[int],
    temperature: float,
    max_new_tokens: int,
    limit: int,
    seed: int,
    resamples: int = 1000,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Greedy answers and n samples per example; the summary dict (and per-sample rows if asked)."""
    greedy_sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, n=1)
    greedy = sample_and_score(engine, task, pool, tokenizer, examples, greedy_sampling, task_cfg, limit=limit)
    sampled_sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens, n=n, seed=seed + 7)
    sampled = sample_and_score(
        engine, task, pool, tokenizer, examples, sampled_sampling, task_cfg, limit=limit
    )
    correct = np.array([is_correct(r) for r in sampled], dtype=np.float64).reshape(len(examples), n)
    greedy_correct = np.array([is_correct(r) for r in greedy], dtype=np.float64)
    summary = summarize(
        correct,
        greedy_correct,
        ks=list(ks),
        levels=[ex.level for ex in examples],
        resamples=max(resamples, 1),
        seed=seed,
    )
    if rows is not None:
        for kind, group in (("greedy", greedy), ("sample", sampled)):
            rows += [
                {
                    "id": r.example.id,
                    "level": r.example.level,
                    "kind": kind,
                    "prompt": r.example.prompt,
                    "response": r.completion.text,
                    "answer": r.example.answer,
                    "reward": r.reward.score,
                    "correct": is_correct(r),
                    "finish": r.completion.finish_reason,
                }
                for r in group
            ]
    return summary


def resolve_model_path(spec: str) -> str:
    """A checkpoint folder, a run folder (its newest checkpoint), or a model path / hub id as given."""
    from trgrpo.run import checkpoint

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        found = checkpoint.list_checkpoints(path / "checkpoints") or checkpoint.list_checkpoints(path)
        if not found:
            raise ConfigError(
                f"eval.checkpoint={spec!r}: no model (config.json) or checkpoints/step_N inside"
            )
        return str(found[-1])
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"eval.checkpoint={spec!r} does not exist")
    return spec


def run_eval(cfg: Config, out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate eval.checkpoint (or the configured model) on the task's test split; write eval.json."""
    import dataclasses

    from hydra.core.hydra_config import HydraConfig

    from trgrpo.models.load import context_limit, load_policy
    from trgrpo.rollout import make_engine
    from trgrpo.run import host
    from trgrpo.tasks import make_task
    from trgrpo.tasks.verify_pool import VerifyPool

    host.configure(cfg.trainer)  # the model is evaluated on the CPU (load_policy's device)
    e = resolve(cfg).eval
    if any(k > e.n for k in e.ks):
        raise ConfigError(f"eval.ks={e.ks} must all be ≤ eval.n={e.n}")
    if e.size < 1:
        raise ConfigError(f"eval.size={e.size} must be ≥ 1 (test prompts)")
    model_cfg = cfg.model
    if e.checkpoint:
        model_cfg = dataclasses.replace(cfg.model, path=resolve_model_path(e.checkpoint))
    out_dir = out_dir or Path(HydraConfig.get().runtime.output_dir)
    task = make_task(cfg.task)
    examples = task.dataset("test", e.size, cfg.task.data_seed)  # checked before the model is loaded
    if not examples:
        raise ConfigError(
            f"task={cfg.task.name}: the test split is empty (eval.size={e.size}): these settings allow too "
            "few distinct problems once the training pool is removed; widen the task's settings or lower "
            "task.train_size"
        )
    policy, tokenizer = load_policy(model_cfg, cfg.task, seed=cfg.seed)
    engine = make_engine(cfg.rollout, policy, tokenizer, seed=cfg.seed, precision=cfg.trainer.precision)
    rows: list[dict[str, Any]] = []
    with (
        VerifyPool(
            cfg.task, workers=cfg.trainer.verify_workers, timeout=cfg.trainer.verify_timeout, task=task
        ) as pool,
        contextlib.closing(engine),
    ):
        summary = evaluate_examples(
            engine,
            task,
            pool,
            tokenizer,
            examples,
            cfg.task,
            n=e.n,
            ks=e.ks,
            temperature=e.temperature,
            max_new_tokens=cfg.rollout.max_new_tokens,
            limit=context_limit(policy, model_cfg),
            seed=cfg.seed,
            resamples=e.bootstrap,
            rows=rows,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"task": cfg.task.name, "model": model_cfg.path or model_cfg.name, "metrics": summary}
    (out_dir / "eval.json").write_text(json.dumps(record, indent=2))
    with (out_dir / "eval_samples.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print_summary(cfg.task.name, record["model"], summary)
    log.info("wrote %s", out_dir / "eval.json")
    return summary


def print_summary(task: str, model: str, summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [k for k in summary if not k.endswith("_ci") and isinstance(summary[k], float)]
    table = Table(title=f"{task}: {model} ({summary['prompts']} prompts × {summary['samples']} samples)")
    table.add_column("level")
    for name in names:
        table.add_column(name, justify="right")
    levels = [("all", summary), *sorted(summary.get("by_level", {}).items())]
    for label, values in levels:
        table.add_row(str(label), *[_fmt(values, name) for name in names])
    Console().print(table)


def _fmt(values: dict[str, Any], name: str) -> str:
    lo, hi = values.get(f"{name}_ci", (float("nan"), float("nan")))
    return f"{values[name]:.3f} [{lo:.3f}, {hi:.3f}]"
