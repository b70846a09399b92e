"""Whether a checkpoint may be resumed under the current config: which keys change the training math
(refused unless forced) and which only change how the work is done (allowed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trgrpo.config.schema import ConfigError

log = logging.getLogger("trgrpo")

# Config keys (dotted, or a prefix of them) whose change alters what a resumed run computes...
MATH_KEYS = (
    "seed",
    "algo",
    "rollout",
    "task",
    "model",
    "trainer.lr",
    "trainer.prompts_per_step",
    "trainer.ppo_epochs",
    "trainer.minibatches",
    "trainer.max_grad_norm",
    "trainer.warmup_steps",
    "trainer.weight_decay",
)
# ...except these, which change how the work is done (or what is evaluated), not the training math.
FREE_KEYS = (
    "rollout.engine",
    "rollout.batch_size",
    "rollout.hf_decode",
    "rollout.compile",
    "rollout.gpu_memory_utilization",
    "rollout.tensor_parallel_size",
    "rollout.sleep",
    "task.eval_size",
    "model.max_context",
    "model.trust_remote_code",
)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, current)} for the keys that differ and change the training math."""
    a, b = _flatten(saved), _flatten(current)
    absent = "<absent>"
    return {
        key: (a.get(key, absent), b.get(key, absent))
        for key in sorted(a.keys() | b.keys())
        if a.get(key, absent) != b.get(key, absent) and _under(key, MATH_KEYS) and not _under(key, FREE_KEYS)
    }


def check_config(path: Path, state: Mapping[str, Any], config: Mapping[str, Any], *, force: bool) -> None:
    """Refuse to resume with a config that changes the math (unless forced) or ends before the checkpoint.

    `trainer.steps` may grow: continuing a run for longer is what resuming is for.
    """
    steps = config["trainer"]["steps"]
    if steps < state["step"]:
        raise ConfigError(
            f"trainer.steps={steps} is below the step of the checkpoint to resume ({path}: step "
            f"{state['step']}); raise trainer.steps or resume from an earlier checkpoint"
        )
    if "config" not in state:
        log.warning("checkpoint %s has no saved config: resuming without checking it", path)
        return
    changed = config_changes(state["config"], config)
    if not changed:
        return
    listed = "; ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in changed.items())
    if not force:
        raise ConfigError(
            f"trainer.resume: the config differs from the checkpoint's ({path}) in keys that change "
            f"training: {listed}. Restore them, or set trainer.resume_force=true to resume anyway"
        )
    log.warning("resuming with a config that differs from the checkpoint's (forced): %s", listed)
