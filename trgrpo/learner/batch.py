"""From rollouts to tensors: token-budget micro-batches with the response columns aligned.

Each row is [left padding | prompt | response | right padding]. Every prompt ends at the same column
P, so the response of every row occupies columns P .. P+T−1 and the logits that predict it sit at
P−1 .. P+T−2: one slice, no per-row gather. Position ids count real tokens only (as generation did),
so left padding changes nothing. Rows are sorted by length and packed into micro-batches whose padded
size stays within the token budget; padding is local to a micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trgrpo.run.records import Rollout


@dataclass(frozen=True)
class MicroBatch:
    """Tensors of one forward/backward pass. B rows, L = P + T columns."""

    rows: tuple[int, ...]  # indices into the step's rollouts (none for an `idle` micro-batch)
    input_ids: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] long, 1 = real token
    position_ids: Tensor  # [B, L] long
    prompt_width: int  # P: response column t is input column P + t
    response_ids: Tensor  # [B, T] long (pad where response_mask is False past the end)
    response_mask: Tensor  # [B, T] bool, True = the policy generated it (counts in the loss)
    advantages: Tensor  # [B] float32
    sampler_logprobs: Tensor  # [B, T] float32 (0 where response_mask is False)
    # rows with the same prompt (a group's samples): `first` [U] one row per distinct prompt, `owner`
    # [B] the index into `first` of each row's prompt; None when every row's prompt is distinct
    first: Tensor | None = None
    owner: Tensor | None = None


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row indices so that rows × longest row ≤ max_tokens per group (a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * max(lengths[i], lengths[current[-1]]) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def make_microbatches(
    rollouts: Sequence[Rollout], advantages: Tensor, *, max_tokens: int, pad_id: int
) -> list[MicroBatch]:
    lengths = [len(r.prompt_ids) + len(r.completion.token_ids) for r in rollouts]
    return [collate(rollouts, advantages, rows, pad_id) for rows in pack(lengths, max_tokens)]


def collate(rollouts: Sequence[Rollout], advantages: Tensor, rows: Sequence[int], pad_id: int) -> MicroBatch:
    chosen = [rollouts[i] for i in rows]
    width_p = max(len(r.prompt_ids) for r in chosen)
    width_t = max(1, max(len(r.completion.token_ids) for r in chosen))
    b = len(chosen)
    input_ids = torch.full((b, width_p + width_t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width_p + width_t), dtype=torch.long)
    response_mask = torch.zeros((b, width_t), dtype=torch.bool)
    sampler = torch.zeros((b, width_t), dtype=torch.float32)
    for i, r in enumerate(chosen):
        p, c = r.prompt_ids, r.completion
        t = len(c.token_ids)
        input_ids[i, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        attention[i, width_p - len(p) : width_p + t] = 1
        if t:
            input_ids[i, width_p : width_p + t] = torch.tensor(c.token_ids, dtype=torch.long)
            response_mask[i, :t] = torch.tensor(c.response_mask, dtype=torch.bool)
            sampler[i, :t] = torch.tensor(c.logprobs, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(r.prompt_ids), len(distinct)) for r in chosen]
    first = [owner.index(u) for u in range(len(distinct))]
    shared = len(distinct) < len(chosen)
    return MicroBatch(
        rows=tuple(rows),
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_width=width_p,
        response_ids=input_ids[:, width_p:].clone(),
        response_mask=response_mask,
        advantages=advantages[list(rows)].float(),
        sampler_logprobs=sampler,
        first=torch.tensor(first, dtype=torch.long) if shared else None,
        owner=torch.tensor(owner, dtype=torch.long) if shared else None,
    )


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in mb.__dict__.items()}
    return MicroBatch(**fields)


def idle(mb: MicroBatch) -> MicroBatch:
    """A one-row copy of `mb` that belongs to no rollout (`rows` empty), every response column masked in.

    Under FSDP every forward and backward is a collective, so all ranks must run as many micro-batches;
    a rank with fewer runs these: the learner takes them through forward and backward with a zero loss,
    and counts them nowhere (not in the normaliser, not in the metrics).
    """
    return MicroBatch(
        rows=(),
        input_ids=mb.input_ids[:1],
        attention_mask=mb.attention_mask[:1],
        position_ids=mb.position_ids[:1],
        prompt_width=mb.prompt_width,
        response_ids=mb.response_ids[:1],
        response_mask=torch.ones_like(mb.response_mask[:1]),
        advantages=mb.advantages[:1],
        sampler_logprobs=mb.sampler_logprobs[:1],
    )
