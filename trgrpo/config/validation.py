"""Every check of a config, each problem naming the fields to change: `problems` lists them (cheap, no
model or data, so `trgrpo plan` prints them all), `validate` raises ConfigError with all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from trgrpo.config.schema import (
    DEMO_STYLES,
    TASK_CONFIGS,
    Config,
    ConfigError,
    LogicTaskConfig,
    MathTaskConfig,
    ToolQATaskConfig,
    TrainerConfig,
    demo_slip_problem,
)
from trgrpo.models import files as model_files

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
WEIGHT_SHAPES = ("none", "sigmoid", "linear", "reverse")
PLACEMENTS = ("loss", "ratio")
WEIGHT_NORMALIZE = ("none", "mean")
ENGINES = ("hf", "vllm")
HF_DECODES = ("auto", "shared_prefix", "generate")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
FP32_MATMULS = ("auto", "highest", "medium")
THREADS = ("auto", "a number ≥ 1", "0 (torch's default)")


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_distributed(setting: str) -> bool:
    """Whether `trainer.distributed` (auto | true | false) asks for a process group in this launch.
    true also shards a one-process torchrun launch."""
    setting = str(setting).lower()
    return setting == "true" or (setting == "auto" and launched_world_size() > 1)


def _one_of(value: object, valid: tuple, key: str) -> list[str]:
    if value in valid:
        return []
    return [f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}"]


def host_problems(t: TrainerConfig) -> list[str]:
    """trainer.threads, trainer.fp32_matmul and trainer.precision (also checked by host.configure: eval and build-tiny run
    without `validate`)."""
    threads = t.threads
    if isinstance(threads, str):
        ok = threads == "auto" or threads.isdigit()
    else:
        ok = isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0
    out = [] if ok else [f"trainer.threads={threads!r} is not valid; choose one of: {', '.join(THREADS)}"]
    out += _one_of(t.fp32_matmul, FP32_MATMULS, "trainer.fp32_matmul")
    return out + _one_of(t.precision, PRECISIONS, "trainer.precision")


def problems(cfg: Config) -> list[str]:
    """Every validation problem of a config, each naming the fields to change (empty when fine).

    Cheap and side-effect free (no model, no data), so `trgrpo plan` can print them all. Local-looking
    paths (./, /, ~, or a data-file suffix) must exist; hub ids are not looked up here.
    """

    a, r, t, e, m, task = cfg.algo, cfg.rollout, cfg.trainer, cfg.eval, cfg.model, cfg.task
    w = a.weights

    def missing(value: str | None, *, folder: bool = False) -> bool:
        if not value or "{" in value:  # unset, or a per-split pattern such as data_{split}.jsonl
            return False
        path = Path(value).expanduser()
        local = value.startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl", ".parquet", ".csv")
        return local and not (path.is_dir() if folder else path.exists())

    model_file_problem = model_files.problem(m.path)
    is_model_file = bool(m.path) and (
        m.path.startswith(model_files.PACKAGE_SCHEME) or m.path.endswith(".gguf")
    )
    out = _one_of(task.name, tuple(sorted(TASK_CONFIGS)), "task.name")
    out += _one_of(task.few_shot_style, ("user", "chat"), "task.few_shot_style")
    out += [
        f"task.few_shot[{i}] needs a 'question' and an 'answer' (got {sorted(shot)})"
        for i, shot in enumerate(task.few_shot)
        if not {"question", "answer"} <= set(shot)
    ]
    out += _one_of(a.agg, AGG_MODES, "algo.agg")
    out += _one_of(a.kl_estimator, KL_ESTIMATORS, "algo.kl_estimator")
    out += _one_of(w.shape, WEIGHT_SHAPES, "algo.weights.shape")
    out += _one_of(w.placement, PLACEMENTS, "algo.weights.placement")
    out += _one_of(w.normalize, WEIGHT_NORMALIZE, "algo.weights.normalize")
    out += _one_of(a.tis, ("none", "token", "sequence"), "algo.tis")
    out += _one_of(r.engine, ENGINES, "rollout.engine")
    out += _one_of(m.dtype, DTYPES, "model.dtype")
    out += host_problems(t)
    out += _one_of(cfg.logger.name, ("jsonl", "wandb"), "logger.name")
    out += _one_of(cfg.logger.mode, ("offline", "online", "disabled"), "logger.mode")
    mode, world = str(t.distributed).lower(), launched_world_size()
    out += _one_of(mode, ("auto", "true", "false"), "trainer.distributed")
    out += _one_of(str(t.padding_free).lower(), ("auto", "true", "false"), "trainer.padding_free")
    out += _one_of(str(r.compile).lower(), ("auto", "true", "false"), "rollout.compile")
    ranks = world if wants_distributed(mode) else 1
    sigmoidal = w.shape in ("sigmoid", "reverse")
    resume_ok = t.resume in (None, "", "none", "false", "auto") or Path(t.resume).expanduser().exists()
    checks = [
        (r.group_size >= 2, f"rollout.group_size={r.group_size}: group advantages need at least 2 samples"),
        (t.prompts_per_step >= 1, f"trainer.prompts_per_step={t.prompts_per_step} must be ≥ 1"),
        (t.steps >= 1, f"trainer.steps={t.steps} must be ≥ 1"),
        (t.ppo_epochs >= 1, f"trainer.ppo_epochs={t.ppo_epochs} must be ≥ 1"),
        (t.minibatches >= 1, f"trainer.minibatches={t.minibatches} must be ≥ 1"),
        (
            t.prompts_per_step % max(t.minibatches, 1) == 0,
            f"trainer.prompts_per_step={t.prompts_per_step} is not divisible by trainer.minibatches="
            f"{t.minibatches}: each minibatch must hold whole groups",
        ),
        (
            mode != "false" or world == 1,
            f"trainer.distributed=false under torchrun with WORLD_SIZE={world}: every process would train "
            "alone into the same run directory; set trainer.distributed=auto or launch one process",
        ),
        (
            mode != "true" or "WORLD_SIZE" in os.environ,
            "trainer.distributed=true needs a torchrun launch (WORLD_SIZE is not set): run `torchrun "
            "--nproc-per-node N -m trgrpo train ...`, or set trainer.distributed=auto",
        ),
        (
            t.prompts_per_step % ranks == 0,
            f"trainer.prompts_per_step={t.prompts_per_step} is not divisible by the {ranks} torchrun "
            "processes (WORLD_SIZE): each rank samples an equal share of whole groups",
        ),
        (
            t.prompts_per_step % ranks != 0 or (t.prompts_per_step // ranks) % max(t.minibatches, 1) == 0,
            f"trainer.prompts_per_step={t.prompts_per_step} gives {t.prompts_per_step // ranks} prompts to "
            f"each of {ranks} ranks, not divisible by trainer.minibatches={t.minibatches}: each rank's "
            "minibatches must hold whole groups",
        ),
        (
            not wants_distributed(mode) or r.engine != "vllm" or r.tensor_parallel_size == 1,
            f"rollout.tensor_parallel_size={r.tensor_parallel_size} with rollout=vllm under torchrun is "
            "not supported yet (each rank runs its own engine): set rollout.tensor_parallel_size=1",
        ),
        (
            ranks == 1 or not t.compile,
            f"trainer.compile=true with {ranks} torchrun processes is not supported yet (the body is "
            "compiled before FSDP2 wraps its layers): set trainer.compile=false under torchrun",
        ),
        (t.lr > 0, f"trainer.lr={t.lr} must be > 0"),
        (t.max_grad_norm > 0, f"trainer.max_grad_norm={t.max_grad_norm} must be > 0"),
        (t.warmup_steps >= 0, f"trainer.warmup_steps={t.warmup_steps} must be ≥ 0 (optimizer steps)"),
        (t.weight_decay >= 0, f"trainer.weight_decay={t.weight_decay} must be ≥ 0"),
        (r.max_new_tokens >= 1, f"rollout.max_new_tokens={r.max_new_tokens} must be ≥ 1"),
        (r.temperature > 0, f"rollout.temperature={r.temperature} must be > 0 for training (sampling)"),
        (0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]"),
        (r.batch_size >= 0, f"rollout.batch_size={r.batch_size} must be ≥ 0 (0 = all prompts at once)"),
        (
            r.hf_decode in HF_DECODES,
            f"rollout.hf_decode={r.hf_decode!r} is not valid; choose one of: {', '.join(HF_DECODES)}",
        ),
        (
            0 < r.gpu_memory_utilization <= 1,
            f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]",
        ),
        (r.tensor_parallel_size >= 1, f"rollout.tensor_parallel_size={r.tensor_parallel_size} must be ≥ 1"),
        (a.clip_low >= 0 and a.clip_high >= 0, "algo.clip_low and algo.clip_high must be ≥ 0"),
        (a.clip_low < 1, f"algo.clip_low={a.clip_low} must be < 1 (the ratio floor is 1 − clip_low)"),
        (a.kl_coef >= 0, f"algo.kl_coef={a.kl_coef} must be ≥ 0"),
        (a.agg_max_len >= 0, f"algo.agg_max_len={a.agg_max_len} must be ≥ 0 (0 = rollout.max_new_tokens)"),
        (
            a.dynamic_sampling_max_rounds >= 0,
            f"algo.dynamic_sampling_max_rounds={a.dynamic_sampling_max_rounds} must be ≥ 0",
        ),
        (
            task.tiny_warmstart_steps >= 1,
            f"task.tiny_warmstart_steps={task.tiny_warmstart_steps} must be ≥ 1",
        ),
        (
            m.tiny.warmstart_steps >= 0,
            f"model.tiny.warmstart_steps={m.tiny.warmstart_steps} must be ≥ 0 (0 = task.tiny_warmstart_steps)",
        ),
        (a.tis_cap >= 1.0, f"algo.tis_cap={a.tis_cap} must be ≥ 1 (a cap below 1 shrinks every token)"),
        (w.lower <= w.upper, f"algo.weights.lower={w.lower} must be ≤ algo.weights.upper={w.upper}"),
        (w.tau > 0, f"algo.weights.tau={w.tau} must be > 0"),
        (
            not sigmoidal or w.alpha > 0,
            f"algo.weights.alpha={w.alpha} must be > 0 for algo.weights.shape={w.shape} "
            "(α ≤ 0 flattens the weight or reverses its direction; use shape=reverse for a decreasing one)",
        ),
        (
            not sigmoidal or w.lower >= 0,
            f"algo.weights.lower={w.lower} must be ≥ 0: a negative weight flips the sign of a token's gradient",
        ),
        (
            w.shape != "linear" or 0 <= w.alpha <= 1,
            f"algo.weights.alpha={w.alpha} must be in [0, 1] for algo.weights.shape=linear "
            "(w = α·p + 1 − α is negative for small p when α > 1 and decreasing in p when α < 0)",
        ),
        (t.max_tokens_per_microbatch >= 1, "trainer.max_tokens_per_microbatch must be ≥ 1"),
        (t.logprob_chunk >= 1, "trainer.logprob_chunk must be ≥ 1"),
        (t.eval_every >= 0 and t.save_every >= 0, "trainer.eval_every and trainer.save_every must be ≥ 0"),
        (t.eval_samples >= 1, f"trainer.eval_samples={t.eval_samples} must be ≥ 1"),
        (t.keep_last >= 0, f"trainer.keep_last={t.keep_last} must be ≥ 0 (0 keeps every checkpoint)"),
        (
            resume_ok,
            f"trainer.resume={t.resume!r} does not exist; use trainer.resume=auto (the newest checkpoint "
            "of this run), a checkpoint or run folder, or null",
        ),
        (
            t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
            f"trainer.device={t.device!r} is not valid; choose one of: auto, cpu, cuda, cuda:<index>",
        ),
        (t.samples_per_step >= 0, f"trainer.samples_per_step={t.samples_per_step} must be ≥ 0"),
        (t.verify_timeout > 0, f"trainer.verify_timeout={t.verify_timeout} must be > 0 seconds"),
        (t.verify_workers >= 0, "trainer.verify_workers must be ≥ 0 (0 = verify in this process)"),
        (t.max_bad_steps >= 1, f"trainer.max_bad_steps={t.max_bad_steps} must be ≥ 1"),
        (
            m.path is not None or m.name == "tiny",
            f"model={m.name} needs model.path (a local model folder or a hub id)",
        ),
        (model_file_problem is None, str(model_file_problem)),
        (
            model_file_problem is not None or is_model_file or not missing(m.path, folder=True),
            f"model.path={m.path!r} does not exist (or is not a folder): give a local model folder, "
            "or a hub id such as Qwen/Qwen2.5-1.5B-Instruct",
        ),
        (m.max_context >= 0, f"model.max_context={m.max_context} must be ≥ 0 (0 = the model's own)"),
        (
            m.max_context <= 0 or r.max_new_tokens < m.max_context,
            f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt within "
            f"model.max_context={m.max_context}: lower the first or raise the second",
        ),
        (
            m.path is not None or (m.tiny.heads >= 1 and m.tiny.hidden_size % m.tiny.heads == 0),
            f"model.tiny.hidden_size={m.tiny.hidden_size} must be a multiple of model.tiny.heads={m.tiny.heads}",
        ),
        (task.train_size >= t.prompts_per_step, "task.train_size must be ≥ trainer.prompts_per_step"),
        (task.eval_size >= 1, f"task.eval_size={task.eval_size} must be ≥ 1"),
        (task.format_reward >= 0, f"task.format_reward={task.format_reward} must be ≥ 0 (0 = off)"),
        (
            task.overlong_penalty >= 0,
            f"task.overlong_penalty={task.overlong_penalty} must be ≥ 0 (it is subtracted; 0 = off)",
        ),
        (demo_slip_problem(task.demo_slip) is None, demo_slip_problem(task.demo_slip)),
        (e.size >= 1, f"eval.size={e.size} must be ≥ 1 (test prompts)"),
        (e.n >= 1, f"eval.n={e.n} must be ≥ 1 (samples per prompt)"),
        (len(e.ks) >= 1, "eval.ks must list at least one k, e.g. eval.ks=[1]"),
        (all(1 <= k <= e.n for k in e.ks), f"eval.ks={e.ks} must lie in 1..eval.n={e.n}"),
        (e.temperature >= 0, f"eval.temperature={e.temperature} must be ≥ 0"),
        (e.bootstrap >= 0, f"eval.bootstrap={e.bootstrap} must be ≥ 0 (0 = no confidence intervals)"),
        (not missing(e.checkpoint), f"eval.checkpoint={e.checkpoint!r} does not exist"),
    ]
    if isinstance(task, MathTaskConfig):
        checks += [
            (
                task.dataset is not None or bool(task.generators),
                "task=math needs task.generators or task.dataset",
            ),
            (
                not missing(task.dataset),
                f"task.dataset={task.dataset!r} does not exist (a local file or folder, or a hub id)",
            ),
            (
                task.answer_format in ("raw", "gsm8k", "boxed"),
                f"task.answer_format={task.answer_format!r} is not valid; choose one of: raw, gsm8k, boxed",
            ),
            (all(g.weight > 0 for g in task.generators), "every task.generators[i].weight must be > 0"),
        ]
        checks += [
            (
                task.demo_style in DEMO_STYLES,
                f"task.demo_style={task.demo_style!r} is not valid; choose one of: {', '.join(sorted(DEMO_STYLES))}",
            ),
            (
                task.demo_slip == 0 or task.demo_style != "plain",
                f"task.demo_slip={task.demo_slip} forgets carries in worked columns: set "
                "task.demo_style=columns or task.demo_slip=0",
            ),
        ]
    if isinstance(task, LogicTaskConfig):
        checks += [
            (
                1 <= task.min_people <= task.max_people,
                f"task.min_people={task.min_people} and task.max_people={task.max_people} need 1 ≤ min ≤ max",
            ),
            (not missing(task.path), f"task.path={task.path!r} does not exist (a local K&K file or folder)"),
        ]
    if isinstance(task, ToolQATaskConfig):
        checks += [
            (
                1 <= task.min_hops <= task.max_hops,
                f"task.min_hops={task.min_hops} and task.max_hops={task.max_hops} need 1 ≤ min ≤ max",
            ),
            (task.max_turns >= 1, f"task.max_turns={task.max_turns} must be ≥ 1"),
            (task.top_k >= 1, f"task.top_k={task.top_k} must be ≥ 1"),
            (
                task.max_response_tokens >= 1,
                f"task.max_response_tokens={task.max_response_tokens} must be ≥ 1",
            ),
            (
                task.questions_per_world >= 1,
                f"task.questions_per_world={task.questions_per_world} must be ≥ 1",
            ),
            (0 <= task.calc_share <= 1, f"task.calc_share={task.calc_share} must be in [0, 1]"),
            (
                (task.questions_path is None) == (task.corpus_path is None),
                "real data needs both task.questions_path and task.corpus_path (or neither)",
            ),
            (not missing(task.questions_path), f"task.questions_path={task.questions_path!r} does not exist"),
            (not missing(task.corpus_path), f"task.corpus_path={task.corpus_path!r} does not exist"),
        ]
    out += [message for ok, message in checks if not ok]
    return out


def validate(cfg: Config) -> None:
    """Raise ConfigError listing every problem, or return."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(found))
