"""Atomic checkpoints: an HF-format model folder plus everything needed to resume exactly.

A checkpoint is written to a temporary folder beside its final place and renamed into place, so a
crash mid-write leaves at most a `.tmp-*` folder that is never picked up; the previous checkpoint
stays intact until the new one is complete. `checkpoints/step_N/` holds the model and tokenizer
(loadable by `transformers` and `trgrpo eval`) and `trainer_state.pt`: optimizer, scheduler, step,
python/numpy/torch RNG states, the prompt sampler's position and learner counters.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("trgrpo")
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path, step: int, *, model, tokenizer, trainer_state: dict[str, Any], keep_last: int = 0
) -> Path:
    """Write checkpoints/step_<step> atomically; keep the newest `keep_last` (0 = all)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=directory))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "rng": rng_state(), **trainer_state}, tmp / STATE_FILE)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def find_resume(spec: str | None, run_dir: Path) -> Path | None:
    """`auto`: the newest checkpoint in run_dir (None if there is none); a path: that checkpoint."""
    if spec in (None, "", "none", "false"):
        return None
    if spec == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if found:
        return found[-1]
    from trgrpo.config import ConfigError

    raise ConfigError(
        f"trainer.resume={spec!r}: no checkpoint there (expected a step_N folder or a run folder)"
    )


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_weights(model, path: Path) -> None:
    """Load the checkpoint's weights into an existing module (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    if tied:
        model.tie_weights()
