"""FSDP2 (`fully_shard`) for the learner's models, and what a sharded model needs from its users.

Each decoder layer is one FSDP unit and the `Scorer` around the model is the root unit, which holds
the rest (embeddings, final norm, lm_head; tied or not, they share that unit). The learner calls the
model body and the head separately (logprobs.py) and FSDP2 gathers a unit's parameters only in the
pre-forward hook of the module it wraps, so both run inside the root's forward.

Gradients are summed over ranks, not averaged: every rank's loss is already its share of the global
loss (the normaliser is all-reduced, learner.py), so the sum is the gradient of the one-process loss.
On GPU with trainer.precision=bf16, parameters are all-gathered in bfloat16 and gradients reduced in
float32 (the lm_head then runs in bfloat16, unlike one process); on CPU there is no mixed precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trgrpo.config.schema import ConfigError
from trgrpo.run import checkpoint, distributed


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # torch < 2.6 has FSDP2 only under a private name
        raise ConfigError(
            f"trainer.distributed needs torch >= 2.6 (FSDP2), found {torch.__version__}"
        ) from err
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model inside `model` (the classes it names in
    `_no_split_modules`); none for other models, which are then sharded as one unit."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(root: nn.Module, *, precision: str) -> None:
    """Shard `root` in place across the process group: one unit per decoder layer, then the root."""
    fsdp_module, mixed_precision, fully_shard = _fsdp()
    device = next(root.parameters()).device
    if precision == "bf16" and device.type == "cuda":
        policy = mixed_precision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = mixed_precision()
    for layer in decoder_layers(root):
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, fsdp_module):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG; the sum is what we want
            module.set_gradient_divide_factor(1.0)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, whole tensor) of every parameter, one at a time. A sharded parameter is all-gathered,
    which is a collective: every rank must consume the iterator to its end. An unsharded model yields
    its parameters themselves."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        yield name, (p.detach().full_tensor() if isinstance(p, DTensor) else p)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_ for sharded (DTensor) gradients: the total norm over all ranks' shards,
    the same clip coefficient on every rank. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):  # a partial norm per rank until reduced
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def save_sharded(
    directory: Path,
    step: int,
    *,
    model,
    optimizer,
    tokenizer,
    trainer_state: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """`save` for a learner sharded with FSDP2: every rank calls it (collectives inside).

    Every rank writes its shards of the model and optimizer to `sharded/` (DCP); the full model is
    gathered to rank 0, which writes the HF folder, the tokenizer and `trainer_state.pt` and renames
    the folder into place. The folder must be on a file system all ranks share.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    target = directory / f"step_{step}"
    made: Path | str | None = None
    if distributed.is_main():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            made = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=directory))
        except OSError as err:
            made = str(err)
    made = distributed.broadcast(made)  # the folder every rank writes into, or rank 0's error
    if not isinstance(made, Path):
        raise checkpoint.CheckpointError(f"writing checkpoint {target} failed: {made}")
    tmp = made
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / checkpoint.SHARDED_DIR
        )
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if distributed.is_main():
            model.save_pretrained(tmp, state_dict=full)
            tokenizer.save_pretrained(tmp)
            checkpoint.commit_folder(
                tmp, target, {"step": step, "rng": checkpoint.rng_state(), **trainer_state}
            )
    except BaseException as err:
        checkpoint.discard_folder(tmp if distributed.is_main() else None, target, err)
    if distributed.is_main():
        checkpoint.tidy(directory, keep_last)
    return target
