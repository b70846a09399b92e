"""The embedded tiny model: a small Llama with a byte-level BPE tokenizer trained on the task's text,
warm-started by a short supervised pass on the task's demonstrations so that RL starts from a policy
that is sometimes right. Cached under $TRGRPO_CACHE (default ~/.cache/trgrpo) keyed by its config,
built once and atomically (a half-built model is never picked up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from trgrpo.config.schema import ConfigError, TaskConfig, TinyConfig
from trgrpo.models.chat import encode_prompt
from trgrpo.models.files import cache_lock, cache_root
from trgrpo.tasks import make_task  # the tiny model is warm-started on its task's data

log = logging.getLogger("trgrpo")
TINY_FORMAT = 2  # bump when the build recipe changes, so old caches are not reused
WARMSTART_EXAMPLES = 16384  # the most warm-start examples drawn; tasks keep test data out of these
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Whole tokens for the tags the tasks use, so stop strings end exactly on a token boundary.
TAG_TOKENS = [
    f"<{s}{t}>" for t in ("think", "answer", "search", "information", "calc", "result") for s in ("", "/")
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_seed(tiny: TinyConfig, run_seed: int) -> int:
    """The seed the tiny model is built with: model.tiny.seed, or the run's own when that is unset."""
    return run_seed if tiny.seed is None else tiny.seed


def warmstart_size(tiny: TinyConfig, task: TaskConfig) -> int:
    """Training examples the warm start reads: the first ones of the task's training stream."""
    return min(task.train_size, tiny.warmstart_steps * tiny.warmstart_batch)


def tiny_key(tiny: TinyConfig, task: TaskConfig, seed: int) -> str:
    """The cache key: everything the build depends on, and nothing else (not the RL-only task fields)."""
    ignored = (
        "train_size",  # only through warmstart_size, which is in the key
        "eval_size",
        "reward",
        "format_reward",
        "overlong_penalty",
        "max_new_tokens",
        "tiny_warmstart_steps",  # resolved into tiny.warmstart_steps
    )
    data_fields = {k: v for k, v in dataclasses.asdict(task).items() if k not in ignored}
    model_fields = {
        k: v for k, v in dataclasses.asdict(tiny).items() if k != "seed"
    }  # `seed` is the one used
    parts = [TINY_FORMAT, model_fields, data_fields, seed, warmstart_size(tiny, task)]
    blob = json.dumps(parts, sort_keys=True, default=str)
    return f"{task.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def build_tiny(tiny: TinyConfig, task_cfg: TaskConfig, *, seed: int = 0, force: bool = False) -> Path:
    """Build (or find) the tiny model for a task; returns its folder."""
    if tiny.warmstart_steps == 0:  # an unresolved config: the task's own number (config.resolve)
        tiny = dataclasses.replace(tiny, warmstart_steps=task_cfg.tiny_warmstart_steps)
    target = cache_root() / "tiny" / tiny_key(tiny, task_cfg, seed)
    if (target / "config.json").exists() and not force:
        return target
    with cache_lock(target):  # torchrun ranks or sweep jobs asking at once: one builds, the rest wait
        if (target / "config.json").exists() and not force:
            return target
        started = time.perf_counter()
        task = make_task(task_cfg)
        examples = task.dataset("train", warmstart_size(tiny, task_cfg), seed=task_cfg.data_seed)
        tokenizer = _train_tokenizer(task, examples, tiny.vocab_size)
        model = _init_model(tokenizer, tiny, seed)
        final_loss = _warm_start(model, tokenizer, task, examples, tiny, seed)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"task": task_cfg.name, "warmstart_loss": final_loss, "seconds": time.perf_counter() - started}
        (tmp / "trgrpo_tiny.json").write_text(json.dumps(info))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    log.info(
        "built tiny model for task=%s in %.0fs (warm-start loss %.3f): %s",
        task_cfg.name,
        time.perf_counter() - started,
        final_loss,
        target,
    )
    return target


def _render(tokenizer, example, segments) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + demonstration + EOS, and which of them the warm start trains on.

    Everything after the prompt is trained, tool observations included (RL still masks them): the warm
    start is the tiny model's only pretraining, and predicting documents that repeat their title's
    name is what teaches it to copy names, which a tool_qa policy needs for every query and answer.
    """
    ids = encode_prompt(tokenizer, example.prompt, example.context)
    mask = [False] * len(ids)
    for text, _trainable in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [True] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(True)
    return ids, mask


def _train_tokenizer(task, examples, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Digits one per token (as Llama 3 / Qwen do): arithmetic stays learnable for a tiny model.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    texts = [ex.prompt for ex in examples[:2000]]
    texts += ["".join(text for text, _ in task.demonstration(ex)) for ex in examples[:2000]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    tokenizer.add_tokens(TAG_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _init_model(tokenizer, tiny: TinyConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.heads,
        max_position_embeddings=tiny.max_position,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _warm_start(model, tokenizer, task, examples, tiny: TinyConfig, seed: int) -> float:
    """Supervised learning on demonstrations (trainable segments only); returns the last loss."""
    rows = [_render(tokenizer, ex, task.demonstration(ex)) for ex in examples]
    too_long = sum(len(ids) > tiny.max_position for ids, _ in rows)
    if too_long:
        raise ConfigError(
            f"{too_long} warm-start examples exceed model.tiny.max_position={tiny.max_position}"
        )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=tiny.warmstart_lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    warmup = max(1, tiny.warmstart_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, tiny.warmstart_steps) / tiny.warmstart_steps))
        ),
    )
    model.train()
    loss_value = float("nan")
    for _ in range(tiny.warmstart_steps):
        pick = torch.randint(len(rows), (tiny.warmstart_batch,), generator=generator).tolist()
        input_ids, labels, attention = _pad([rows[i] for i in pick], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def _pad(rows, pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # HF's ignore index, local to this call
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask), torch.tensor(ids), -100)
    return input_ids, labels, attention
