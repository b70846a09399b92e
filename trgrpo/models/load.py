"""Loading the policy and its tokenizer: a hub id, a local folder or GGUF file (`model.path`), or the
cached tiny model of the task (`model=tiny`, built on first use).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trgrpo.config.schema import ConfigError, ModelConfig, TaskConfig
from trgrpo.models.files import local_model
from trgrpo.models.tiny import build_tiny, tiny_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(model: ModelConfig, task: TaskConfig, *, seed: int = 0, device: str = "cpu"):
    """(model, tokenizer) from `model.path`, or the cached tiny model of `task` (built if missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.path is None:
        if model.name != "tiny":
            raise ConfigError(f"model={model.name} needs model.path (a hub id or a local folder)")
        path = build_tiny(model.tiny, task, seed=tiny_seed(model.tiny, seed))
    else:
        path = local_model(model.path)
        looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
        if looks_local and not Path(path).expanduser().is_dir():
            raise ConfigError(f"model.path={path!r} does not exist (give a local model folder or a hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=model.trust_remote_code)
        policy = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=DTYPES[model.dtype], trust_remote_code=model.trust_remote_code
        )
    except OSError as err:
        raise ConfigError(f"model.path={path!r} could not be loaded: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy.to(device), tokenizer


def context_limit(model, cfg: ModelConfig) -> int:
    return cfg.max_context or int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
