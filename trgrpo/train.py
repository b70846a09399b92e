"""`trgrpo train`: the RL loop, top to bottom in `run`.

prompts → engine (+ agent loop for tools) → verifier pool → group advantages (→ dynamic sampling) →
learner step (old/ref log-probs, token weights, policy loss, clip, optimizer) → weight sync →
metrics, samples, evaluation, checkpoints. No callbacks or hooks: change the loop to change training.

Under torchrun (`trainer.distributed`) every rank runs this loop: it draws the same N prompts, samples
and scores its own slice of them with its own engine, and steps the shared FSDP2-sharded learner on
its rollouts. Rank 0 alone logs, evaluates and writes run.json; all ranks write checkpoint shards.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from trgrpo.algo.advantages import group_advantages, zero_advantage_groups
from trgrpo.config.schema import Config, resolve
from trgrpo.config.validation import validate, wants_distributed
from trgrpo.evaluate import evaluate_examples
from trgrpo.learner import fsdp
from trgrpo.learner.learner import Learner, NonFiniteStep
from trgrpo.models.load import context_limit, load_policy
from trgrpo.rollout import decode_compile, make_engine
from trgrpo.rollout.collect import sample_and_score
from trgrpo.run import checkpoint, distributed, host
from trgrpo.run.interrupts import InterruptGuard
from trgrpo.run.metrics import MetricsLogger, truncate_logs, write_status
from trgrpo.run.records import Rollout, Sampling
from trgrpo.run.sampler import PromptSampler
from trgrpo.tasks import make_task
from trgrpo.tasks.data import task_data
from trgrpo.tasks.verify_pool import VerifyPool

log = logging.getLogger("trgrpo")


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (HF's own switch; training mode only)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rollout_metrics(rollouts: list[Rollout], rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    lengths = torch.tensor([float(sum(r.completion.response_mask)) for r in rollouts])
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "verify/unscorable": float(sum(r.reward.unscorable for r in rollouts)),
        "rollout/response_len": float(lengths.mean()),
        "rollout/truncated": float(np.mean([r.completion.finish_reason == "length" for r in rollouts])),
        "rollout/zero_adv_groups": float(zero_advantage_groups(rewards.view(-1, group_size)).float().mean()),
    }
    keys = {k for r in rollouts for k in r.reward.components}
    for key in sorted(keys):
        name = f"rollout/{key.removeprefix('diag_')}" if key.startswith("diag_") else f"reward/{key}"
        out[name] = float(np.mean([r.reward.components.get(key, 0.0) for r in rollouts]))
    return out


def sample_groups(ctx, sampler: PromptSampler, cfg: Config, step: int):
    """This rank's groups of G rollouts: its slice of the N prompts drawn (all N in one process). With
    dynamic sampling (DAPO), equal-reward groups are dropped and more prompts are drawn, for at most
    `dynamic_sampling_max_rounds` extra rounds, until every rank has its share.

    Every rank draws the same prompts from its own copy of the sampler, so the samplers stay equal
    and the union of the ranks' slices is the one-process batch; each rank samples with its own seed.
    """
    n, g = cfg.trainer.prompts_per_step, cfg.rollout.group_size
    mine = distributed.share(n)
    kept: list[Rollout] = []
    drawn = 0
    rounds = 1 + (cfg.algo.dynamic_sampling_max_rounds if cfg.algo.dynamic_sampling else 0)
    for r in range(rounds):
        examples = [ctx["train_data"][i] for i in sampler.next(n)[mine]]
        seed = cfg.seed * 1_000_003 + step * 131 + r + distributed.rank() * 65_537
        sampling = dataclasses.replace(ctx["sampling"], seed=seed)
        fresh = sample_and_score(
            ctx["engine"],
            ctx["task"],
            ctx["pool"],
            ctx["tokenizer"],
            examples,
            sampling,
            cfg.task,
            limit=ctx["limit"],
        )
        drawn += len(fresh)
        if not cfg.algo.dynamic_sampling:
            return fresh, drawn
        for k in range(0, len(fresh), g):
            group = fresh[k : k + g]
            if len({ro.reward.score for ro in group}) > 1:
                kept += group
        if distributed.all_true(len(kept) >= len(examples) * g):
            break
    return (kept[: len(examples) * g] or fresh), drawn


def evaluate_now(ctx, cfg: Config) -> dict[str, float]:
    """The held-out evaluation's metrics (`eval/<task>/...`) and its duration (`time/eval`)."""
    start = time.perf_counter()
    result = evaluate_examples(
        ctx["engine"],
        ctx["task"],
        ctx["pool"],
        ctx["tokenizer"],
        ctx["eval_data"],
        cfg.task,
        n=cfg.trainer.eval_samples,
        ks=[k for k in cfg.eval.ks if k <= cfg.trainer.eval_samples] or [1],
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        limit=ctx["limit"],
        seed=cfg.seed,
        resamples=200,
    )
    metrics = {f"eval/{cfg.task.name}/{k}": v for k, v in result.items() if isinstance(v, float)}
    return {**metrics, "time/eval": time.perf_counter() - start}


def build(cfg: Config, device: torch.device, *, shard: bool = False) -> tuple[Learner, PromptSampler, dict]:
    """The pieces the loop wires: the learner (which owns the policy), the prompt sampler, and `ctx`
    (engine, task, tokenizer, verifier pool, data, sampling settings).

    shard: the learner shards the policy with FSDP2, which a `transformers` generate cannot run
    (every rank would have to take part in every forward), so the hf engine gets an unsharded copy.
    """
    t = cfg.trainer
    task = make_task(cfg.task)
    train_data, eval_data = task_data(task, cfg.task)  # checked before any model is loaded or built
    policy, tokenizer = load_policy(cfg.model, cfg.task, seed=cfg.seed, device=str(device))
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.algo.kl_coef > 0 else None
    own = copy.deepcopy(policy) if shard and cfg.rollout.engine == "hf" else policy
    engine = make_engine(cfg.rollout, own, tokenizer, seed=cfg.seed, precision=t.precision)
    sampler = PromptSampler(len(train_data), cfg.seed)
    learner = Learner(
        policy,
        ref_model,
        trainer=t,
        algo=cfg.algo,
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        shard=shard,
    )
    r = cfg.rollout
    ctx = {
        "engine": engine,
        "task": task,
        "tokenizer": tokenizer,
        "limit": context_limit(policy, cfg.model),
        "sampling": Sampling(
            temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, n=r.group_size
        ),
        "pool": VerifyPool(cfg.task, workers=t.verify_workers, timeout=t.verify_timeout, task=task),
        "train_data": train_data,
        "eval_data": eval_data,
    }
    return learner, sampler, ctx


def learn(rollouts: list[Rollout], learner: Learner, engine, cfg: Config) -> tuple[dict[str, float], list]:
    """One step's update from this rank's scored rollouts: group advantages, the optimizer step, the
    new weights pushed to the engine. Returns the step's metrics (over every rank's rollouts, with
    time/update and time/sync) and the whole batch."""
    g = cfg.rollout.group_size
    t0 = time.perf_counter()
    rewards = torch.tensor([ro.reward.score for ro in rollouts], dtype=torch.float32)
    advantages = group_advantages(rewards.view(-1, g), std_normalize=cfg.algo.std_normalize).view(-1)
    batch = distributed.gather_objects(rollouts)  # every rank's: the step's whole batch
    scores = torch.tensor([ro.reward.score for ro in batch], dtype=torch.float32)
    metrics = rollout_metrics(batch, scores, g)
    metrics.update(learner.step(rollouts, advantages, group_size=g))
    t1 = time.perf_counter()
    engine.load_weights(fsdp.full_parameters(learner.model))
    metrics.update({"time/update": t1 - t0, "time/sync": time.perf_counter() - t1})
    return metrics, batch


def _start_fields(cfg: Config, start: int, resume_from: Path | None, host_settings) -> dict:
    """run.json when training starts (or resumes): what runs, from where, on what host settings."""
    return dict(
        status="running",
        task=cfg.task.name,
        algo=cfg.algo.name,
        seed=cfg.seed,
        git_sha=git_sha(),
        steps=cfg.trainer.steps,
        last_step=start,
        resumed_from=None if resume_from is None else str(resume_from),
        error=None,
        checkpoint_error=None,
        threads=host_settings.threads,
        precision=host_settings.precision,
        fp32_matmul=cfg.trainer.fp32_matmul,
        decode_compile=cfg.rollout.compile,
        matmul_gflops=host_settings.gflops,
    )


def run(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Train; returns the last step's metrics (with the final evaluation).

    Under torchrun with trainer.distributed on, joins the process group (and leaves it at the end)
    and trains in rank 0's run directory.
    """
    validate(resolve(cfg))
    t = cfg.trainer
    device, shard = pick_device(t.device), wants_distributed(t.distributed)
    if shard:
        device = distributed.init(device)
        run_dir = distributed.broadcast(run_dir)  # Hydra's timestamped folder may differ between ranks
    main = distributed.is_main()
    if not main:
        log.setLevel(logging.WARNING)  # one console: rank 0's

    def status(**fields) -> None:
        if main:
            write_status(run_dir, **fields)

    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir.resolve())
    host_settings = host.configure(t, device)  # resolves threads/precision=auto into cfg: recorded below
    t.precision = distributed.broadcast(t.precision)  # under torchrun every rank takes rank 0's probes
    t.fp32_matmul = distributed.broadcast(t.fp32_matmul)
    torch.set_float32_matmul_precision(t.fp32_matmul)
    decode_compile(cfg.rollout, device)  # resolves rollout.compile=auto into cfg: recorded below
    config = dataclasses.asdict(cfg)
    resume_from, state = checkpoint.resume_state(t.resume, run_dir, config, force=t.resume_force)
    start = state["step"] if state is not None else 0
    if checkpoint.wants_resume(t.resume) and main:
        truncate_logs(run_dir, start)  # the steps after the checkpoint are done again
    if state is not None and start == t.steps:
        log.info("%s is at trainer.steps=%d: nothing left to train", resume_from, t.steps)
        status(status="finished", last_step=start)
        distributed.destroy()
        return {}
    seed_everything(cfg.seed)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.exists() and main:  # called without Hydra (tests, scripts): save the config ourselves
        hydra_cfg.parent.mkdir(parents=True, exist_ok=True)
        hydra_cfg.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    status(**_start_fields(cfg, start, resume_from, host_settings))

    learner, sampler, ctx = build(cfg, device, shard=shard)
    policy, tokenizer, engine = learner.model, ctx["tokenizer"], ctx["engine"]
    if state is not None:
        checkpoint.restore(resume_from, state, model=policy, learner=learner, sampler=sampler)
        engine.load_weights(fsdp.full_parameters(policy))
        log.info("resumed from %s at step %d", resume_from, start)
        del state  # the optimizer's copy
    logger = MetricsLogger(
        run_dir, cfg.logger, config=config, total_steps=t.steps, start_step=start, enabled=main
    )
    if cfg.algo.weights.shape != "none":
        log.info("token weights: %s, placement %s", cfg.algo.weights.shape, cfg.algo.weights.placement)

    def save(step: int, rng: dict | None = None) -> None:
        """A failed write (disk full, permissions) is reported and training goes on."""
        trainer_state = checkpoint.trainer_state(learner, sampler, config)
        if rng is not None:
            trainer_state["rng"] = rng
        where = dict(model=policy, tokenizer=tokenizer, trainer_state=trainer_state, keep_last=t.keep_last)
        try:
            if learner.sharded:
                fsdp.save_sharded(run_dir / "checkpoints", step, optimizer=learner.optimizer, **where)
            else:
                checkpoint.save(run_dir / "checkpoints", step, **where)
        except checkpoint.CheckpointError as err:
            log.warning("%s; the previous checkpoints are intact, training goes on", err)
            status(checkpoint_error=f"step {step}: {err}")

    if main and t.eval_every and t.eval_at_start and start == 0:  # the baseline the curves start from
        logger.log(0, evaluate_now(ctx, cfg))
    guard = InterruptGuard()  # Ctrl-C while a step is being applied waits for its end
    metrics: dict[str, float] = {}
    completed = start  # the last step whose update, metrics and status are all written
    rollback = None  # sampler and RNG state before this step's sampling, while sampling runs
    try:
        with guard:
            for step in range(start + 1, t.steps + 1):
                rollback = (sampler.state(), checkpoint.rng_state())
                t0 = time.perf_counter()
                rollouts, drawn = sample_groups(ctx, sampler, cfg, step)
                engine.sleep()  # vLLM on GPU: free its memory for the learner; load_weights wakes it
                t1 = time.perf_counter()
                with guard.hold():
                    metrics, batch = learn(rollouts, learner, engine, cfg)
                    t3 = time.perf_counter()
                    if metrics.get("weights/constant") == 1.0 and cfg.algo.weights.shape != "none":
                        logger.warn_once(
                            "constant",
                            "token weights are constant over a batch: this configuration is GRPO "
                            "with a scale (check algo.weights.tau; see README, 'TR-GRPO weight')",
                        )
                    tokens = sum(len(ro.completion.token_ids) for ro in batch)
                    metrics["time/generate"] = t1 - t0
                    metrics["rollout/drawn"] = distributed.all_reduce([float(drawn)])[0]
                    last = step == t.steps
                    if main and (last or (t.eval_every and step % t.eval_every == 0)):
                        metrics.update(evaluate_now(ctx, cfg))
                    metrics["time/step"] = time.perf_counter() - t0
                    metrics["perf/tokens_per_s"] = tokens / max(t3 - t0, 1e-9)
                    logger.log(step, metrics)
                    logger.samples(step, [_sample_row(ro) for ro in batch[: t.samples_per_step]])
                    if last and main:
                        logger.write_eval(step, metrics, cfg.task.name)
                    status(last_step=step)
                    completed, rollback = step, None
                    if last or (t.save_every and step % t.save_every == 0):
                        save(step)
        status(status="finished", last_step=t.steps)
        logger.log_summary(cfg.task.name)  # main rank only: the others' logger is disabled
    except KeyboardInterrupt:
        if guard.torn:
            log.warning("stopped inside step %d's update: no checkpoint written for it", completed + 1)
        elif learner.sharded:  # ranks may stop at different points: a collective save could hang
            log.warning("a distributed run resumes from its last periodic checkpoint")
        elif completed > start and not checkpoint.is_saved(run_dir / "checkpoints", completed):
            if rollback is not None:  # stopped while sampling: back to the state after `completed`
                sampler.load(rollback[0])
            save(completed, rng=None if rollback is None else rollback[1])
        status(status="interrupted", last_step=completed)
        log.warning("interrupted after step %d; continue with trainer.resume=auto in %s", completed, run_dir)
        raise
    except NonFiniteStep as err:
        status(status="failed", error=str(err))
        raise
    except Exception as err:
        status(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        logger.close()
        ctx["pool"].close()
        ctx["engine"].close()
        distributed.destroy()
    return metrics


def _sample_row(ro: Rollout) -> dict:
    return {
        "id": ro.example.id,
        "prompt": ro.example.prompt,
        "response": ro.completion.text,
        "answer": ro.example.answer,
        "reward": ro.reward.score,
        "finish": ro.completion.finish_reason,
    }
