"""Rollout engines by name, behind the `Engine` protocol (rollout/base.py)."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import torch

from trgrpo.config.schema import ConfigError, RolloutConfig
from trgrpo.rollout.base import Engine

__all__ = ["ENGINES", "Engine", "decode_compile", "make_engine"]

ENGINES = ("hf", "vllm")

log = logging.getLogger("trgrpo")


def decode_compile(cfg: RolloutConfig, device: torch.device | str = "cpu") -> bool:
    """rollout.compile for the hf engine's decode step, with `auto` resolved and written back (so the
    run's config records it) and logged: on CPU where a C++ compiler is found, off on GPUs (not yet
    checked on one: true opts in) and for the vllm engine."""
    value = str(cfg.compile).lower()
    if value != "auto":
        cfg.compile = value  # Hydra reads `true` as a bool, which the str field keeps as "True"
        return value == "true"
    device = torch.device(device)
    if cfg.engine != "hf":
        on, why = False, f"rollout.engine={cfg.engine}"
    elif device.type != "cpu":
        on, why = False, f"{device.type}: not yet checked there, rollout.compile=true opts in"
    else:
        # what inductor's CPU backend compiles its kernels with: $CXX, else g++ (clang++ on macOS)
        found = shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))
        on, why = found is not None, f"C++ compiler {found}" if found else "no C++ compiler found"
    cfg.compile = "true" if on else "false"
    log.info("rollout: decode step %s (rollout.compile=auto: %s)", "compiled" if on else "eager", why)
    return on


def make_engine(cfg: RolloutConfig, model, tokenizer, *, seed: int = 0, precision: str = "fp32") -> Engine:
    """`precision` (trainer.precision, resolved): the hf engine's compute precision, as the learner's."""
    if cfg.engine == "hf":
        from trgrpo.rollout.hf_engine import HFEngine

        return HFEngine(
            model,
            tokenizer,
            batch_size=cfg.batch_size,
            decode=cfg.hf_decode,
            precision=precision,
            compile=decode_compile(cfg, next(model.parameters()).device),
        )
    if cfg.engine == "vllm":
        from trgrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, cfg, seed=seed)
    raise ConfigError(f"rollout.engine={cfg.engine!r} is not valid; choose one of: {', '.join(ENGINES)}")
