"""`trgrpo plan`: what a run would do, worked out from its config alone.

Prints the names, the batch arithmetic (rollouts, minibatches, optimizer steps, micro-batches), the
loss with its exact normaliser, the token-weight curve and its caveats, the schedule, and then every
validation problem, raising ConfigError when there is one (exit 2: `trgrpo plan` doubles as a
validator). It does not load a model, a tokenizer or any data: prompt lengths are unknown here, so
micro-batch counts are given for a few stated prompt-length guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from trgrpo.algo.losses import LOG_RATIO_CLAMP
from trgrpo.config.plan_weights import PROBES, curve  # noqa: F401 (PROBES, curve re-exported)
from trgrpo.config.plan_weights import weight_rows as token_weight_rows
from trgrpo.config.schema import Config, ModelConfig
from trgrpo.config.validation import problems, validate
from trgrpo.models.files import PACKAGE_SCHEME

PROMPT_GUESSES = (64, 256, 1024)  # prompt lengths in tokens for the micro-batch arithmetic
_KL_FORMULAS = {
    "k1": "k1 = log p − log p_ref",
    "k2": "k2 = ½(log p − log p_ref)²",
    "k3": "k3 = exp(log p_ref − log p) − (log p_ref − log p) − 1 (low-variance, clamped to ±10)",
}

Row = tuple[str, str]


@dataclass(frozen=True)
class Plan:
    """Titled sections of (key, value) rows, then warnings and validation problems."""

    sections: tuple[tuple[str, tuple[Row, ...]], ...]
    warnings: tuple[str, ...]
    problems: tuple[str, ...]


def numbers(cfg: Config) -> dict[str, int]:
    """The batch arithmetic of one training step and of the run. Invalid values (which `problems`
    reports) are clamped so that this never divides by zero."""
    t, r = cfg.trainer, cfg.rollout
    n, g, mb, epochs = t.prompts_per_step, r.group_size, max(t.minibatches, 1), max(t.ppo_epochs, 1)
    return {
        "prompts_per_step": n,
        "group_size": g,
        "rollouts_per_step": n * g,
        "minibatches": mb,
        "rollouts_per_minibatch": n * g // mb,
        "optimizer_steps_per_step": epochs * mb,
        "optimizer_steps_total": epochs * mb * t.steps,
        "rollouts_total": n * g * t.steps,
        "response_cap": response_cap(cfg),
        "agg_max_len": cfg.algo.agg_max_len or r.max_new_tokens,
    }


def response_cap(cfg: Config) -> int:
    """Response tokens one rollout can have: rollout.max_new_tokens, or for multi-turn tasks the cap on
    the whole response (task.max_response_tokens, tool output included)."""
    return getattr(cfg.task, "max_response_tokens", None) or cfg.rollout.max_new_tokens


def microbatches(cfg: Config, prompt_len: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per minibatch) when every prompt has `prompt_len` tokens
    and every response hits the cap: learner/batch.py packs rows so that rows × longest ≤ budget."""
    budget = max(cfg.trainer.max_tokens_per_microbatch, 1)
    rows = max(1, budget // (prompt_len + response_cap(cfg)))
    return rows, math.ceil(numbers(cfg)["rollouts_per_minibatch"] / rows)


def normaliser(cfg: Config) -> str:
    """The exact denominator of the configured aggregation (algo/losses.py: aggregate)."""
    s, big_l = numbers(cfg)["rollouts_per_minibatch"], numbers(cfg)["agg_max_len"]
    if cfg.algo.agg == "token-mean":
        return (
            "Σ over all response tokens of the optimizer step / their count (across micro-batches and ranks)"
        )
    if cfg.algo.agg == "seq-mean-token-mean":
        return (
            f"mean over the step's sequences of each sequence's token mean ({s} sequences per optimizer step)"
        )
    if cfg.algo.agg == "seq-mean-token-sum-norm":
        source = "algo.agg_max_len" if cfg.algo.agg_max_len else "rollout.max_new_tokens"
        return (
            f"Σ / (agg_max_len or rollout.max_new_tokens × sequences) = Σ / ({big_l} × {s}), "
            f"L = {source} = {big_l}, S = {s} sequences per optimizer step"
        )
    return f"unknown (algo.agg={cfg.algo.agg!r})"


def _run_rows(cfg: Config) -> list[Row]:
    task, m, r = cfg.task, cfg.model, cfg.rollout
    task_text = (
        f"{task.name} (train_size={task.train_size}, eval_size={task.eval_size}, reward={task.reward})"
    )
    if hasattr(task, "max_turns"):
        task_text += f"; multi-turn: ≤ {task.max_turns} tool calls"
    model_text = _model_text(m)
    engine = f"{r.engine} (temperature {r.temperature:g}, top_p {r.top_p:g}"
    engine += f", max_new_tokens {r.max_new_tokens}{' per turn' if hasattr(task, 'max_turns') else ''})"
    logger = cfg.logger.name + (f" (mode {cfg.logger.mode})" if cfg.logger.name == "wandb" else "")
    return [
        ("task", task_text),
        ("algo", cfg.algo.name),
        ("model", f"{model_text}, dtype {m.dtype}"),
        ("engine", engine),
        ("logger", f"{logger}; metrics.jsonl always"),
        ("seed", str(cfg.seed)),
        ("device", cfg.trainer.device),
        ("threads", _threads_text(cfg.trainer.threads)),
        ("precision", _precision_text(cfg.trainer.precision)),
        ("float32 matmuls", _fp32_matmul_text(cfg.trainer.fp32_matmul)),
        ("decode step", _compile_text(r)),
    ]


def _model_text(m: ModelConfig) -> str:
    """The model a run loads: the tiny preset (path null), else the path (after the preset's name,
    unless that is the default `tiny`, which model.path replaces) and what kind of path it is."""
    if m.path is None:
        return f"{m.name}: built, warm-started and cached on first use (not by plan)"
    if m.path.endswith(".gguf"):
        package = m.path.removeprefix(PACKAGE_SCHEME).partition("/")[0]
        kind = "GGUF" + (f" shipped by the package {package}" if m.path.startswith(PACKAGE_SCHEME) else "")
        kind += ", converted once to a Hugging Face folder in the model cache"
    elif m.path.startswith((".", "/", "~")) or Path(m.path).expanduser().is_dir():
        kind = "local folder"
    else:
        kind = "hub id"
    return f"{m.path} ({kind})" if m.name == "tiny" else f"{m.name}: {m.path} ({kind})"


def _threads_text(threads: int | str) -> str:
    if threads == "auto":
        from trgrpo.run.host import auto_threads

        return f"auto (resolved at start: {auto_threads()} here, the cores this process may use)"
    return "0: torch's default" if str(threads) == "0" else str(threads)


def _precision_text(precision: str) -> str:
    if precision == "auto":
        return (
            "auto (resolved at start: bf16 on a GPU with bf16, or where a CPU matmul probe finds it faster)"
        )
    return precision


def _fp32_matmul_text(value: str) -> str:
    if value == "auto":
        return "auto (resolved at start: medium on a CPU where a probe finds it faster and as accurate)"
    return value


def _compile_text(r) -> str:
    if r.engine != "hf":
        return f"{r.engine}'s own"
    value = str(r.compile).lower()
    if value == "auto":
        return "auto (resolved at start: torch.compile'd on a CPU with a C++ compiler, else eager)"
    return "torch.compile'd (rollout.compile=true)" if value == "true" else "eager (rollout.compile=false)"


def _batch_rows(cfg: Config) -> list[Row]:
    num, t = numbers(cfg), cfg.trainer
    groups = t.prompts_per_step // max(t.minibatches, 1)
    reuse = t.ppo_epochs > 1 or t.minibatches > 1
    old = (
        "recomputed once before the updates (one extra no-grad forward per minibatch)"
        if reuse
        else "the current ones, detached (one optimizer step per batch: r = 1)"
    )
    return [
        ("prompts per step N", str(num["prompts_per_step"])),
        ("group size G", str(num["group_size"])),
        ("rollouts per step N·G", str(num["rollouts_per_step"])),
        (
            "minibatches per step",
            f"{t.minibatches} ({groups} groups = {num['rollouts_per_minibatch']} rollouts each)",
        ),
        (
            "optimizer steps per step",
            f"{num['optimizer_steps_per_step']} (ppo_epochs {t.ppo_epochs} × minibatches {t.minibatches})",
        ),
        ("optimizer steps in total", f"{num['optimizer_steps_total']} ({t.steps} training steps)"),
        ("rollouts in total", str(num["rollouts_total"])),
        ("old log-probs", old),
    ]


def _microbatch_rows(cfg: Config) -> list[Row]:
    t, cap = cfg.trainer, response_cap(cfg)
    if hasattr(cfg.task, "max_response_tokens"):
        worst = f"prompt + task.max_response_tokens = prompt + {cap} (rollout.max_new_tokens is per turn)"
    else:
        worst = f"prompt + rollout.max_new_tokens = prompt + {cap}"
    rows = [
        ("token budget", f"{t.max_tokens_per_microbatch} padded tokens per forward/backward"),
        ("worst-case tokens per rollout", worst),
    ]
    for guess in PROMPT_GUESSES:
        per, count = microbatches(cfg, guess)
        note = "; one rollout alone exceeds the budget" if guess + cap > t.max_tokens_per_microbatch else ""
        rows.append(
            (
                f"micro-batches (prompt ≤ {guess})",
                f"{count} per minibatch when every response hits the cap ({per} rows of {guess + cap} tokens{note})",
            )
        )
    rows.append(("log-prob chunk", f"{t.logprob_chunk} tokens per lm_head/log-softmax chunk"))
    return rows


def _loss_rows(cfg: Config) -> list[Row]:
    a, w, num = cfg.algo, cfg.algo.weights, numbers(cfg)
    lo, hi = f"{1 - a.clip_low:g}", f"{1 + a.clip_high:g}"
    if w.shape == "none":
        per_token = f"ℓ = −min(r·A, clip(r, {lo}, {hi})·A)"
    elif w.placement == "ratio":
        per_token = f"ℓ = −min(w·r·A, clip(w·r, {lo}, {hi})·A)"
    else:
        per_token = f"ℓ = −w·min(r·A, clip(r, {lo}, {hi})·A)"
    if a.tis != "none":
        per_token = per_token.replace("ℓ = −", "ℓ = −c·", 1)
    term = "ℓ + β·KL" if a.kl_coef > 0 else "ℓ"
    total = {
        "token-mean": f"Σ_{{i,t}} m·({term}) / Σ_{{i,t}} m",
        "seq-mean-token-mean": f"(1/S) Σ_i [Σ_t m·({term}) / Σ_t m]",
        "seq-mean-token-sum-norm": f"Σ_{{i,t}} m·({term}) / (L·S)",
    }.get(a.agg, "?")
    if a.kl_coef > 0:
        weighted = ", × w (algo.weights.weight_kl)" if w.weight_kl and w.shape != "none" else ""
        kl = f"β = {a.kl_coef:g} × {_KL_FORMULAS.get(a.kl_estimator, a.kl_estimator)} per token{weighted}"
        ref = "loaded: a frozen copy of the initial policy (one more model, one more forward per minibatch)"
    else:
        kl, ref = "off (algo.kl_coef=0)", "not loaded"
    if a.std_normalize:
        adv = f"Â = (R − mean_g R) / (std_g R + 1e-6), std Bessel-corrected over each group of {num['group_size']}"
    else:
        adv = "Â = R − mean_g R (algo.std_normalize=false: no std division, Dr. GRPO)"
    return [
        ("per-token loss", f"{per_token}, m = response_mask (tool output and padding excluded)"),
        ("ratio", f"r = exp(clamp(log p − log p_old, ±{LOG_RATIO_CLAMP:g})), log p over the full vocabulary"),
        ("clip range", f"[{lo}, {hi}] = [1 − clip_low, 1 + clip_high]"),
        ("aggregation", f"algo.agg={a.agg}: loss = {total}"),
        ("normaliser", normaliser(cfg)),
        ("KL term", kl),
        ("reference model", ref),
        ("mismatch (TIS)", _tis_row(a)),
        ("advantages", f"{adv}; a group of equal rewards gives Â = 0"),
    ]


def _tis_row(a) -> str:
    if a.tis == "token":
        return f"c = min(p_old / p_sampler, {a.tis_cap:g}) per token (algo.tis=token)"
    if a.tis == "sequence":
        return f"c = min(Π_t p_old / p_sampler, {a.tis_cap:g}) per sequence (algo.tis=sequence)"
    return "no correction (algo.tis=none); the sampler-vs-learner log-prob gap is logged every step"


def _schedule_rows(cfg: Config) -> list[Row]:
    t, e, a, num = cfg.trainer, cfg.eval, cfg.algo, numbers(cfg)
    passes = t.steps * t.prompts_per_step / max(cfg.task.train_size, 1)
    if a.dynamic_sampling:
        rounds = a.dynamic_sampling_max_rounds
        dynamic = (
            f"on: groups whose {num['group_size']} rewards are all equal are dropped and "
            f"{num['prompts_per_step']} more prompts drawn, ≤ {rounds} extra rounds "
            f"(≤ {(1 + rounds) * num['rollouts_per_step']} rollouts generated per step)"
        )
    else:
        dynamic = "off"
    train_ks = [k for k in e.ks if k <= t.eval_samples] or [1]
    when = f"every {t.eval_every} steps and at the end" if t.eval_every else "at the end only"
    if t.eval_every and t.eval_at_start:
        when = "before training (step 0), " + when
    saves = f"every {t.save_every} steps and the final one" if t.save_every else "the final one only"
    kept = "all kept" if t.keep_last == 0 else f"the newest {t.keep_last} kept"
    resume = {None: "no (trainer.resume=null)", "auto": "auto: the newest checkpoint of the run, if any"}
    return [
        (
            "optimizer",
            f"AdamW, lr {t.lr:g}, weight decay {t.weight_decay:g}, linear warm-up over {t.warmup_steps} "
            f"optimizer steps then constant; gradients clipped at norm {t.max_grad_norm:g}",
        ),
        ("data", f"{t.steps * t.prompts_per_step} prompts drawn = {passes:.2f} passes over task.train_size"),
        ("dynamic sampling", dynamic),
        (
            "eval while training",
            f"{when}: task.eval_size={cfg.task.eval_size} prompts, greedy + trainer.eval_samples="
            f"{t.eval_samples} samples, pass@k for k in {train_ks}",
        ),
        (
            "trgrpo eval",
            f"eval.size={e.size} prompts × eval.n={e.n} samples at T={e.temperature:g}, pass@{e.ks}",
        ),
        ("checkpoints", f"{saves}; {kept} (trainer.keep_last={t.keep_last})"),
        ("resume", resume.get(t.resume, str(t.resume))),
    ]


def _general_warnings(cfg: Config) -> list[str]:
    out = []
    cap, big_l = response_cap(cfg), numbers(cfg)["agg_max_len"]
    if cfg.algo.agg == "seq-mean-token-sum-norm" and cap > big_l:
        out.append(
            f"algo.agg=seq-mean-token-sum-norm divides by L = {big_l} but responses can reach {cap} "
            f"tokens: set algo.agg_max_len={cap} for the Dr. GRPO constant"
        )
    if cfg.rollout.top_p < 1:
        out.append(
            f"rollout.top_p={cfg.rollout.top_p:g} < 1: the sampler's distribution is truncated while log p "
            "is over the full vocabulary: an off-policy gap the loss does not correct (rollout/logprob_diff_*)"
        )
    m = cfg.model
    if m.path is None and min(PROMPT_GUESSES) + cap > m.tiny.max_position:
        out.append(
            f"the tiny model's model.tiny.max_position={m.tiny.max_position} leaves little room: "
            f"responses alone can take {cap} tokens"
        )
    return out


def build_plan(cfg: Config) -> Plan:
    """The plan of a run, as data (no model, tokenizer or data is loaded)."""
    weight_rows, weight_warnings = token_weight_rows(cfg)
    sections = (
        ("run", tuple(_run_rows(cfg))),
        ("batch (one training step)", tuple(_batch_rows(cfg))),
        ("micro-batching (prompt length unknown without a tokenizer)", tuple(_microbatch_rows(cfg))),
        ("loss", tuple(_loss_rows(cfg))),
        ("token weights", tuple(weight_rows)),
        ("schedule", tuple(_schedule_rows(cfg))),
    )
    return Plan(sections, tuple(weight_warnings + _general_warnings(cfg)), tuple(problems(cfg)))


def _styled_lines(plan: Plan) -> list[tuple[str, str]]:
    """(rich style, plain text) per printed line."""
    width = max(len(key) for _, rows in plan.sections for key, _ in rows)
    out: list[tuple[str, str]] = []
    for title, rows in plan.sections:
        out.append(("bold cyan", title))
        out += [("", f"  {key.ljust(width)}  {value}") for key, value in rows]
    out += [("bold yellow", f"WARNING: {text}") for text in plan.warnings]
    out += [("bold red", f"PROBLEM: {text}") for text in plan.problems]
    out.append(("bold red" if plan.problems else "bold green", _verdict(plan)))
    return out


def _verdict(plan: Plan) -> str:
    if plan.problems:
        return f"{len(plan.problems)} problem(s): fix them before training"
    return f"config valid ({len(plan.warnings)} warning(s))"


def plan_lines(cfg: Config) -> list[str]:
    """The plan exactly as `trgrpo plan` prints it, without styling (one greppable line per fact)."""
    return [text for _, text in _styled_lines(build_plan(cfg))]


def print_plan(cfg: Config, console: Console | None = None) -> None:
    """Print the plan; then raise ConfigError listing every problem, if any."""
    console = console or Console(soft_wrap=True, highlight=False)
    console.rule("trgrpo plan")
    for style, text in _styled_lines(build_plan(cfg)):
        console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))
    validate(cfg)
