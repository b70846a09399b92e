"""Rollout engines by name, behind the `Engine` protocol (rollout/base.py)."""

from __future__ import annotations

from trgrpo.config.schema import ConfigError, RolloutConfig
from trgrpo.rollout.base import Engine

__all__ = ["ENGINES", "Engine", "make_engine"]

ENGINES = ("hf", "vllm")


def make_engine(cfg: RolloutConfig, model, tokenizer, *, seed: int = 0, precision: str = "fp32") -> Engine:
    """`precision` (trainer.precision, resolved): the hf engine's compute precision, as the learner's."""
    if cfg.engine == "hf":
        from trgrpo.rollout.hf_engine import HFEngine

        return HFEngine(
            model, tokenizer, batch_size=cfg.batch_size, decode=cfg.hf_decode, precision=precision
        )
    if cfg.engine == "vllm":
        from trgrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, cfg, seed=seed)
    raise ConfigError(f"rollout.engine={cfg.engine!r} is not valid; choose one of: {', '.join(ENGINES)}")
