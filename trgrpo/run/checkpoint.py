"""Atomic checkpoints: an HF-format model folder plus everything needed to resume exactly.

A checkpoint is written to a temporary folder beside its final place and renamed into place, so a
crash mid-write leaves at most a `.tmp-*` folder that is never picked up; the previous checkpoint
stays intact until the new one is complete. `checkpoints/step_N/` holds the model and tokenizer
(loadable by `transformers` and `trgrpo eval`) and `trainer_state.pt`: optimizer, scheduler, step,
python/numpy/torch RNG states, the prompt sampler's position, learner counters and the resolved config.
It holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`, so a
checkpoint from elsewhere cannot run code when it is resumed: one holding anything else is refused.

A sharded learner (FSDP2 under torchrun) writes the same folder plus `sharded/`: model and optimizer
state in torch.distributed.checkpoint (DCP) format, each rank writing its own shards. The HF folder is
then the model gathered to rank 0, and `trainer_state.pt` (rank 0's) has no optimizer. DCP reshards on
load, so such a checkpoint resumes under any number of processes, one included.

Resuming (`trainer.resume`) restores all of it, so the steps after the resume point compute what an
uninterrupted run computes; a config that would change that math is refused (`check_config`).
What this module does not do: decide when to save (the loop does; Ctrl-C handling is interrupts.py).
"""

from __future__ import annotations

import logging
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trgrpo.config.resume import FREE_KEYS, MATH_KEYS, check_config, config_changes  # noqa: F401 (re-exported)
from trgrpo.config.schema import ConfigError

log = logging.getLogger("trgrpo")
STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"  # DCP shards of {"model", "optimizer"}, written by sharded learners
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = (".tmp-step_", ".old-step_")  # prefixes of folders a killed save can leave behind


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous checkpoints are intact."""


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch RNG states as tensors and plain values (numpy's key as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_state = {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, Mapping):  # else the tuple np.random.get_state() gives (older checkpoints)
        n = numpy_state
        keys = n["keys"].numpy().astype(np.uint32)
        numpy_state = (n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path, step: int, *, model, tokenizer, trainer_state: dict[str, Any], keep_last: int = 0
) -> Path:
    """Write checkpoints/step_<step> atomically; keep the newest `keep_last` (0 = all).

    `trainer_state` may carry its own "rng" (the state to resume with); otherwise the current one is
    saved. Any failure removes the partial folder and raises CheckpointError.
    """
    target = directory / f"step_{step}"
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=directory))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        commit_folder(tmp, target, {"step": step, "rng": rng_state(), **trainer_state})
    except BaseException as err:
        discard_folder(tmp, target, err)
    tidy(directory, keep_last)
    return target


def commit_folder(tmp: Path, target: Path, state: dict[str, Any]) -> None:
    """Write the trainer state last, then swap the finished folder into place."""
    torch.save(state, tmp / STATE_FILE)
    if target.exists():  # set aside, not deleted, until the new one is in place
        target.rename(tmp.with_name(f".old-{target.name}-{tmp.name.rsplit('-', 1)[-1]}"))
    tmp.rename(target)


def discard_folder(tmp: Path | None, target: Path, err: BaseException) -> None:
    """Remove a partial folder and re-raise: CheckpointError for an error of the write itself."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, Exception):  # disk full, permissions; torch reports a full disk as RuntimeError
        raise CheckpointError(f"writing checkpoint {target} failed: {err}") from err
    raise err


def tidy(directory: Path, keep_last: int) -> None:
    for leftover in directory.iterdir():  # a killed save's temporary folder, a replaced checkpoint
        if leftover.name.startswith(_LEFTOVER):
            shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def wants_resume(spec: str | None) -> bool:
    return spec not in (None, "", "none", "false")


def find_resume(spec: str | None, run_dir: Path) -> Path | None:
    """`auto`: the newest checkpoint in run_dir (None if there is none); a path: that checkpoint."""
    if not wants_resume(spec):
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
    raise ConfigError(
        f"trainer.resume={spec!r}: no checkpoint there (expected a step_N folder or a run folder)"
    )


def is_saved(directory: Path, step: int) -> bool:
    return (directory / f"step_{step}" / STATE_FILE).exists()


def _legacy_numpy_globals() -> list:
    """What the numpy RNG state of checkpoints written before the plain-value format needs (a uint32
    array): array reconstruction only, which runs no code of the file's choosing."""
    multiarray = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2 | 1
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict[str, Any]:
    """Read trainer_state.pt with `weights_only=True`: tensors and plain values only. Anything else
    (a pickled object that could run code when loaded) is refused with a ConfigError."""
    file = path / STATE_FILE
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise ConfigError(
            f"trainer.resume: {file} holds an object that is not a tensor or plain value{what}: refused, "
            "since loading it could run code; resume only from checkpoints trgrpo wrote"
        ) from err


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


# ------------------------------------------------------------------------------------------ resume


def trainer_state(learner, sampler, config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but the weights and RNG that the next step depends on, plus the config (for checks).
    A sharded learner's optimizer state goes to the DCP shards instead (`learner.fsdp.save_sharded`)."""
    return {
        "optimizer": None if learner.sharded else learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "sampler": sampler.state(),
        "skipped_steps": learner.skipped_steps,
        "bad_steps": learner.bad_steps,
        "config": dict(config),
    }


def resume_state(
    spec: str | None, run_dir: Path, config: Mapping[str, Any], *, force: bool
) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint folder, its loaded state) to resume from, checked against `config`; (None, None)
    for a fresh start."""
    path = find_resume(spec, run_dir)
    if path is None:
        return None, None
    state = load_state(path)
    check_config(path, state, config, force=force)
    return path, state


def restore(path: Path, state: dict[str, Any], *, model, learner, sampler) -> int:
    """Put a loaded checkpoint back into the model, learner, sampler and RNGs; returns its step.

    A checkpoint with DCP shards loads from them (model and optimizer, resharded to this run's ranks);
    a one-process checkpoint loads only into an unsharded learner.
    """
    if (path / SHARDED_DIR).is_dir():
        load_sharded(path, model=model, optimizer=learner.optimizer)
    elif learner.sharded:
        raise ConfigError(
            f"trainer.resume: {path} was written by a one-process run (no {SHARDED_DIR}/ folder) and this "
            "run is distributed; resume it with one process (or start from its weights with model.path)"
        )
    else:
        load_model_weights(model, path)
        learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.skipped_steps = state.get("skipped_steps", 0)
    learner.bad_steps = state.get("bad_steps", 0)
    _config_hyperparameters(learner)
    sampler.load(state["sampler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def load_sharded(path: Path, *, model, optimizer) -> None:
    """Load a checkpoint's DCP shards into a model and its optimizer, sharded or not (a collective
    when the model is sharded: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process reading shards is what DCP calls "no_dist": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path / SHARDED_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _config_hyperparameters(learner) -> None:
    """The config's lr, warm-up and weight decay over the loaded ones (they differ only when forced):
    the same products the scheduler computes, so an unchanged config gives the same floats."""
    t, scheduler = learner.trainer, learner.scheduler
    scheduler.base_lrs = [t.lr] * len(scheduler.base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(learner.optimizer.param_groups, lrs):
        group.update(initial_lr=t.lr, lr=lr, weight_decay=t.weight_decay)
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
