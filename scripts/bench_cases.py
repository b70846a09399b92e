"""The measurements of `scripts/bench.py`, one per process: `python scripts/bench_cases.py '<json case>'`.

Each case prints one line `BENCH_RESULT {json}` last. A fresh process per case keeps the peak-memory
numbers apart: memory is the growth of the process's peak resident set (`ru_maxrss`) from just before
the case's model is loaded to the end of its timed steps (torch's CPU allocations are invisible to
tracemalloc). Cases:

- `ours`:    one training step of this runner (`train.run`'s step, split into phases) on a local model.
- `trl`:     one GRPOTrainer step of TRL on the same model and prompts (needs `trl`: the bench venv).
- `threads`: one step of the default tiny run (`trgrpo train` with no overrides) under N torch threads.
- `memory`:  the log-prob pass (forward + backward) for a large-vocabulary head, chunked or naive.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import statistics
import sys
import time

import torch

MATH_OVERRIDES = ["task=math", "task.train_size=2000"]


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from trgrpo.config.schema import register, resolve

    register()
    with initialize_config_module("trgrpo.conf", version_base=None):
        return resolve(OmegaConf.to_object(hydra_compose("config", overrides=overrides)))


def matmul_rate(
    dtype: torch.dtype, m: int = 4096, k: int = 256, n: int = 1024, seconds: float = 0.5
) -> float:
    """FLOP/s of one [m, k] @ [k, n] matmul (a learner-sized MLP projection) in this process."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (everything but the input embedding; a tied head counts)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - embed.numel() + (head.numel() if head is embed else 0)


# ------------------------------------------------------------------------------------ this runner


def ours(case: dict) -> dict:
    """Phases of `train.run`'s step: generate, verify, old/ref log-probs, update, weight sync."""
    from trgrpo.algo.advantages import group_advantages
    from trgrpo.learner.learner import Learner
    from trgrpo.models.load import context_limit, load_policy
    from trgrpo.rollout import make_engine
    from trgrpo.rollout.collect import encode_prompts
    from trgrpo.run import host
    from trgrpo.run.records import Rollout, Sampling
    from trgrpo.run.sampler import PromptSampler
    from trgrpo.tasks import make_task
    from trgrpo.tasks.verify_pool import VerifyPool
    from trgrpo.train import enable_gradient_checkpointing, seed_everything

    cfg = compose(case["overrides"])
    t, r = cfg.trainer, cfg.rollout
    settings = host.configure(t)  # threads=auto and precision=auto resolve here, as in `trgrpo train`
    seed_everything(cfg.seed)
    task = make_task(cfg.task)
    rss0 = maxrss_bytes()
    policy, tokenizer = load_policy(cfg.model, cfg.task, seed=cfg.seed)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    engine = make_engine(r, policy, tokenizer, seed=cfg.seed, precision=t.precision)
    pool = VerifyPool(cfg.task, workers=t.verify_workers, timeout=t.verify_timeout, task=task)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.algo.kl_coef > 0 else None
    learner = Learner(
        policy,
        ref_model,
        trainer=t,
        algo=cfg.algo,
        temperature=r.temperature,
        max_new_tokens=r.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
    )
    scored = []  # seconds in old/ref log-prob passes (the learner skips them with 1 epoch and β = 0)
    inner_score = learner._score

    def timed_score(model, mbs):
        start = time.perf_counter()
        out = inner_score(model, mbs)
        scored.append(time.perf_counter() - start)
        return out

    learner._score = timed_score
    data = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
    sampler = PromptSampler(len(data), cfg.seed)
    limit = context_limit(policy, cfg.model)
    rows, profiles, peak_rss = [], {}, None
    timed_end = case["warmup"] + case["steps"]
    for step in range(timed_end + (1 if case.get("profile") else 0)):  # profiled: one untimed step more
        scored.clear()
        examples = [data[i] for i in sampler.next(t.prompts_per_step)]
        sampling = Sampling(
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            n=r.group_size,
            seed=step,
        )
        profiling = step == timed_end
        if profiling:  # the peak of the timed steps, before the profiler's own memory
            peak_rss = maxrss_bytes() - rss0
        t0 = time.perf_counter()
        prompts = encode_prompts(tokenizer, examples, limit=limit, max_new_tokens=r.max_new_tokens)
        with profiled(profiling, profiles, "generate"):
            completions = engine.generate(prompts, sampling)
        t1 = time.perf_counter()
        owners = [ex for ex in examples for _ in range(r.group_size)]
        rewards = pool.score(owners, [c.text for c in completions])
        t2 = time.perf_counter()
        rollouts = [
            Rollout(ex, tuple(prompts[k // r.group_size]), c, rw)
            for k, (ex, c, rw) in enumerate(zip(owners, completions, rewards))
        ]
        scores = torch.tensor([rw.score for rw in rewards])
        advantages = group_advantages(scores.view(-1, r.group_size), std_normalize=cfg.algo.std_normalize)
        with profiled(profiling, profiles, "update"):
            learner.step(rollouts, advantages.view(-1), group_size=r.group_size)
        t3 = time.perf_counter()
        engine.load_weights(policy.named_parameters())
        t4 = time.perf_counter()
        old_ref = sum(scored)
        rows.append(
            {
                "generate": t1 - t0,
                "verify": t2 - t1,
                "old_ref": old_ref,
                "update": t3 - t2 - old_ref,
                "sync": t4 - t3,
                "step": t4 - t0,
                "new_tokens": sum(len(c.token_ids) for c in completions),
                # tokens the learner's body runs: a group's prompt once when the learner shares it
                "learner_tokens": sum(len(ro.completion.token_ids) for ro in rollouts)
                + sum(len(p) for p in prompts) * (1 if learner.share_prompts else r.group_size),
            }
        )
    pool.close()
    out = summarize(rows[case["warmup"] : timed_end])
    out.update(
        peak_rss=maxrss_bytes() - rss0 if peak_rss is None else peak_rss, matmul_params=matmul_params(policy)
    )
    out.update(fp32_rate=matmul_rate(torch.float32), bf16_rate=matmul_rate(torch.bfloat16))
    out.update(precision=settings.precision, threads=settings.threads, profiles=profiles)
    out.update(fp32_matmul=settings.fp32_matmul, decode_compile=r.compile)  # resolved by make_engine
    return out


@contextlib.contextmanager
def profiled(enabled: bool, into: dict, phase: str, rows: int = 12):
    """torch.profiler over the block when enabled: its ops by self CPU time, as a table, into[phase]."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    into[phase] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def summarize(rows: list[dict]) -> dict:
    """Median of each field over the timed steps (and every step's time, to show the spread)."""
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    out["steps"] = [round(row["step"], 3) for row in rows]
    return out


# ------------------------------------------------------------------------------------------ TRL


def trl(case: dict) -> dict:
    """TRL's GRPOTrainer on the same model folder, prompts, sizes, lr and loss aggregation."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trgrpo.run.records import Example
    from trgrpo.tasks import make_task

    if case.get("threads"):  # else torch's default, as a TRL user gets it
        torch.set_num_threads(case["threads"])
    if case.get(
        "reuse_host_memory"
    ):  # the malloc setting this runner applies by default, for a like-for-like look
        from trgrpo.run.host import reuse_freed_memory

        reuse_freed_memory()
    cfg = compose(MATH_OVERRIDES)
    task = make_task(cfg.task)
    data = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": ex.prompt}], "answer": ex.answer} for ex in data]
    )

    def math_reward(completions, answer, **_):
        """Our math task's verifier, in this process (TRL calls reward functions inline)."""
        return [
            task.verify(Example("", "", gold), c[0]["content"]).score for c, gold in zip(completions, answer)
        ]

    n, g = case["prompts"], case["group_size"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=n * g,  # one generation batch = one optimizer step
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=case["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        learning_rate=case["lr"],
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",  # token-mean over the whole batch, like algo.agg=token-mean
        num_iterations=1,
        max_steps=case["warmup"] + case["steps"],
        bf16=case["bf16"],
        gradient_checkpointing=case["gradient_checkpointing"],
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if case.get("fp32_matmul"):
        torch.set_float32_matmul_precision(case["fp32_matmul"])
    rss0 = maxrss_bytes()
    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    trainer = GRPOTrainer(
        model=case["model_dir"],
        reward_funcs=math_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    phases: dict[str, float] = {}
    counts: dict[str, int] = {}

    def wrap(name: str, key: str, when=lambda: True):
        inner = getattr(trainer, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            out = inner(*a, **kw)
            if when():
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
            if key == "generate":  # args[0]: the prompt ids of every row; out[0]: the completion ids
                new = sum(len(c) for c in out[0])
                counts["new_tokens"] = counts.get("new_tokens", 0) + new
                counts["learner_tokens"] = counts.get("learner_tokens", 0) + new + sum(map(len, a[0]))
            return out

        setattr(trainer, name, timed)

    wrap("_generate_single_turn", "generate")
    wrap("_calculate_rewards", "verify")
    wrap("_get_per_token_logps_and_entropies", "old_ref", when=lambda: not torch.is_grad_enabled())
    wrap("_generate_and_score_completions", "prepare")
    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            phases.clear()
            counts.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step = time.perf_counter() - self.start
            prepare = phases.get("prepare", 0.0)
            rows.append(
                {
                    "generate": phases.get("generate", 0.0),
                    "verify": phases.get("verify", 0.0),
                    "old_ref": phases.get("old_ref", 0.0),
                    "update": step - prepare,
                    "sync": 0.0,  # generation uses the training module itself
                    "step": step,
                    "new_tokens": counts.get("new_tokens", 0),
                    "learner_tokens": counts.get("learner_tokens", 0),
                }
            )

    trainer.add_callback(StepTimer())
    trainer.train()
    out = summarize(rows[case["warmup"] :])
    model = trainer.model
    out.update(peak_rss=maxrss_bytes() - rss0, matmul_params=matmul_params(model))
    out.update(fp32_rate=matmul_rate(torch.float32), bf16_rate=matmul_rate(torch.bfloat16))
    import transformers
    import trl as trl_module

    out.update(trl_version=trl_module.__version__, transformers_version=transformers.__version__)
    out.update(precision="bf16" if case["bf16"] else "fp32", threads=torch.get_num_threads())
    out.update(fp32_matmul=torch.get_float32_matmul_precision())
    return out


# ---------------------------------------------------------------------------------------- memory


def memory(case: dict) -> dict:
    """Peak RSS growth of log-probs + backward over `tokens` tokens of a [vocab, hidden] head."""
    from trgrpo.learner.logprobs import token_logprobs

    torch.manual_seed(0)
    m, h, v = case["tokens"], case["hidden"], case["vocab"]
    weight = (torch.randn(v, h) * 0.02).requires_grad_()
    hidden = torch.randn(m, h).requires_grad_()
    targets = torch.randint(v, (m,))
    weight.grad = torch.zeros_like(weight)  # allocated before the baseline: both modes need it
    hidden.grad = torch.zeros_like(hidden)
    rss0 = maxrss_bytes()
    start = time.perf_counter()
    if case["mode"] == "chunked":
        logprobs, _ = token_logprobs(hidden, weight, None, targets, temperature=1.0, chunk=case["chunk"])
    else:
        logits = torch.nn.functional.linear(hidden, weight).float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    logprobs.sum().backward()
    return {"peak_rss": maxrss_bytes() - rss0, "seconds": time.perf_counter() - start}


CASES = {"ours": ours, "trl": trl, "threads": ours, "memory": memory}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = CASES[spec["kind"]](spec)
    print("BENCH_RESULT " + json.dumps(result))
