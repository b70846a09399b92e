"""Learner: chunked log-probs equal the naive ones, micro-batching does not change the gradient, and the
learner scores exactly what the engine sampled."""

from __future__ import annotations

import copy

import pytest
import torch

from trgrpo.learner.batch import collate, make_microbatches, pack
from trgrpo.learner.learner import Learner
from trgrpo.learner.logprobs import response_logprobs
from trgrpo.models.chat import encode_prompt
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run.records import Completion, Example, Reward, Rollout, Sampling


def _rollouts(model, tokenizer, n_prompts=3, n=4, seed=0):
    engine = HFEngine(model, tokenizer)
    prompts = [
        f"State the final answer to the following arithmetic problem: {i} + {2 * i} ="
        for i in range(n_prompts)
    ]
    ids = [encode_prompt(tokenizer, p + " x" * i) for i, p in enumerate(prompts)]  # different prompt lengths
    comps = engine.generate(ids, Sampling(temperature=1.0, max_new_tokens=12, n=n, seed=seed))
    ex = [Example(str(i), p, "0") for i, p in enumerate(prompts)]
    return [Rollout(ex[k // n], tuple(ids[k // n]), c, Reward(float(k % 2))) for k, c in enumerate(comps)]


def _naive(model, mb, temperature):
    logits = model(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
    ).logits
    p, t = mb.prompt_width, mb.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : p - 1 + t].float() / temperature, -1)
    return logp.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1) * mb.response_mask


def test_pack_respects_budget_and_keeps_every_row():
    lengths = [5, 30, 12, 7, 30, 2]
    groups = pack(lengths, max_tokens=40)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 40


def test_chunked_logprobs_match_naive_values_and_gradients(tiny):
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    rollouts = _rollouts(model, tokenizer)
    adv = torch.zeros(len(rollouts))
    mb = collate(rollouts, adv, list(range(len(rollouts))), tokenizer.pad_token_id)
    chunked, entropy = response_logprobs(model, mb, temperature=0.7, chunk=5, with_entropy=True)
    naive = _naive(model, mb, 0.7)
    assert torch.allclose(chunked, naive, atol=1e-5)
    assert entropy is not None and (entropy[mb.response_mask] >= 0).all()
    weights = torch.randn_like(naive)
    (chunked * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (naive * weights).sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


def test_learner_scores_what_the_engine_sampled(tiny):
    model, tokenizer, _ = tiny
    rollouts = _rollouts(model, tokenizer, seed=3)
    mb = collate(rollouts, torch.zeros(len(rollouts)), list(range(len(rollouts))), tokenizer.pad_token_id)
    with torch.no_grad():
        learner, _ = response_logprobs(model, mb, temperature=1.0, chunk=64)
    diff = (learner - mb.sampler_logprobs).abs()[mb.response_mask]
    assert diff.numel() > 10
    assert diff.max() < 1e-4  # same ids, same full-vocabulary softmax: equal up to float32 numerics


def test_left_padding_does_not_change_a_rows_logprobs(tiny):
    model, tokenizer, _ = tiny
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=1)
    together = collate(rollouts, torch.zeros(3), [0, 1, 2], tokenizer.pad_token_id)
    alone = collate(rollouts, torch.zeros(3), [0], tokenizer.pad_token_id)
    with torch.no_grad():
        a, _ = response_logprobs(model, together, temperature=1.0, chunk=64)
        b, _ = response_logprobs(model, alone, temperature=1.0, chunk=64)
    t = int(alone.response_mask[0].sum())
    assert torch.allclose(a[0, :t], b[0, :t], atol=1e-5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_budget_microbatches_give_the_gradient_of_one_batch(tiny, agg):
    model, tokenizer, cfg = tiny
    model = copy.deepcopy(model)
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=4, seed=5)
    advantages = torch.linspace(-1.5, 1.5, len(rollouts))
    algo = copy.deepcopy(cfg.algo)
    algo.agg, algo.kl_coef = agg, 0.0
    learner = Learner(
        model,
        None,
        trainer=cfg.trainer,
        algo=algo,
        temperature=1.0,
        max_new_tokens=12,
        pad_id=tokenizer.pad_token_id,
    )

    def grads(max_tokens):
        mbs = make_microbatches(rollouts, advantages, max_tokens=max_tokens, pad_id=tokenizer.pad_token_id)
        model.zero_grad()
        metrics = learner.backward(mbs)
        return len(mbs), [p.grad.clone() for p in model.parameters()], metrics

    n_one, g_one, m_one = grads(10**6)
    n_many, g_many, m_many = grads(80)
    assert n_one == 1 and n_many >= 3
    assert abs(m_one["loss/policy"] - m_many["loss/policy"]) < 1e-6
    for a, b in zip(g_one, g_many):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in g_one)
    learner.padding_free = True  # packed micro-batches through the learner: the same loss and gradient
    _, g_packed, m_packed = grads(80)
    assert abs(m_one["loss/policy"] - m_packed["loss/policy"]) < 1e-6
    for a, b in zip(g_one, g_packed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_observation_tokens_get_no_gradient(tiny):
    """Tokens with response_mask False (tool output) contribute nothing, whatever their advantage."""
    model, tokenizer, cfg = tiny
    model = copy.deepcopy(model)
    prompt = tuple(encode_prompt(tokenizer, "1 + 1 ="))
    ids = tuple(tokenizer.encode("2 <search>x</search> obs obs <answer>2</answer>", add_special_tokens=False))
    n = len(ids)
    masked = Completion(ids, (0.0,) * n, tuple(i < 3 for i in range(n)), "", "stop")
    short = Completion(ids[:3], (0.0,) * 3, (True,) * 3, "", "stop")
    algo = copy.deepcopy(cfg.algo)
    algo.kl_coef = 0.0
    learner = Learner(
        model,
        None,
        trainer=cfg.trainer,
        algo=algo,
        temperature=1.0,
        max_new_tokens=n,
        pad_id=tokenizer.pad_token_id,
    )
    ex = Example("0", "1 + 1 =", "2")

    def grad_of(completion):
        mbs = make_microbatches(
            [Rollout(ex, prompt, completion, Reward(1.0))],
            torch.tensor([1.0]),
            max_tokens=10**6,
            pad_id=tokenizer.pad_token_id,
        )
        model.zero_grad()
        learner.backward(mbs)
        return [p.grad.clone() for p in model.parameters()]

    # Later tokens cannot influence earlier ones (causal), so masking them out equals truncating them.
    for a, b in zip(grad_of(masked), grad_of(short)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("max_new", [12, 1])
def test_shared_prompt_pass_equals_the_one_pass_forward(tiny, max_new):
    """share_prompts: each group's prompt runs through the body once and its samples continue from its
    keys and values; log-probs, entropy and gradients equal the one-pass forward's (float rounding)."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    engine = HFEngine(model, tokenizer)
    texts = [f"What is {i} + {2 * i}?" + " x" * i for i in range(3)]
    ids = [encode_prompt(tokenizer, t) for t in texts]
    comps = engine.generate(ids, Sampling(temperature=1.0, max_new_tokens=max_new, n=4, seed=7))
    rollouts = [
        Rollout(Example(str(k // 4), texts[k // 4], "0"), tuple(ids[k // 4]), c, Reward(0.0))
        for k, c in enumerate(comps)
    ]
    order = [5, 0, 9, 1, 6, 10, 2, 3, 11, 4, 7, 8]  # groups interleaved: sharing must not rely on order
    mb = collate(rollouts, torch.zeros(12), order, tokenizer.pad_token_id)
    assert mb.first is not None and mb.owner is not None and len(mb.first) == 3
    weights = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp, ent = response_logprobs(
            model, mb, temperature=0.7, chunk=5, with_entropy=True, share_prompts=share
        )
        (lp * weights).sum().backward()
        results.append((lp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    m = mb.response_mask
    assert m.sum() > 5
    assert torch.allclose(lp_a[m], lp_b[m], atol=1e-5, rtol=0)
    assert torch.allclose(ent_a[m], ent_b[m], atol=1e-5, rtol=0)
    flat_a, flat_b = torch.cat([g.flatten() for g in g_a]), torch.cat([g.flatten() for g in g_b])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5


def test_distinct_prompts_are_not_shared(tiny):
    model, tokenizer, _ = tiny
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=1)
    mb = collate(rollouts, torch.zeros(3), [0, 1, 2], tokenizer.pad_token_id)
    assert mb.first is None and mb.owner is None


def test_padding_free_pass_equals_the_padded_forward(tiny):
    """padding_free: the micro-batch's real tokens run as one packed row (position ids restart per
    sequence, no attention mask); transformers turns that into a block-diagonal causal mask here (SDPA
    on CPU) and a varlen kernel with flash attention. If sequences could see each other the log-probs
    would differ; they equal the padded forward's, and so do the gradients."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=2, seed=4)  # prompts of different lengths
    mb = collate(rollouts, torch.zeros(6), list(range(6)), tokenizer.pad_token_id)
    assert (mb.attention_mask == 0).any(), "no padding: the test would not show anything"
    weights = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        lp, _ = response_logprobs(model, mb, temperature=0.7, chunk=5, padding_free=packed)
        (lp * weights).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_a, g_a), (lp_b, g_b) = results
    m = mb.response_mask
    assert torch.allclose(lp_a[m], lp_b[m], atol=1e-5, rtol=0)
    flat_a, flat_b = torch.cat([g.flatten() for g in g_a]), torch.cat([g.flatten() for g in g_b])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("auto", False)])
def test_padding_free_setting(tiny, value, expected):
    """auto turns packing on only for flash attention (the tiny model uses SDPA)."""
    from conftest import FAST, make_cfg

    model = tiny[0]
    cfg = make_cfg(*FAST, f"trainer.padding_free={value}")
    learner = Learner(
        model, None, trainer=cfg.trainer, algo=cfg.algo, temperature=1.0, max_new_tokens=8, pad_id=0
    )
    assert learner.padding_free is expected


# ------------------------------------------------------ algo.weights.normalize=mean (w / mean w)


def _weights_learner(model, tokenizer, cfg, *, normalize, placement="loss"):
    algo = copy.deepcopy(cfg.algo)  # tr_grpo's sigmoid weights; no KL term (no reference model)
    algo.kl_coef, algo.weights.normalize, algo.weights.placement = 0.0, normalize, placement
    learner = Learner(
        model,
        None,
        trainer=cfg.trainer,
        algo=algo,
        temperature=1.0,
        max_new_tokens=12,
        pad_id=tokenizer.pad_token_id,
    )
    calls = []
    score = learner._score
    learner._score = lambda scorer, mbs: calls.append(len(mbs)) or score(scorer, mbs)  # count no-grad passes
    return learner, calls


def _step_grad(learner, model, rollouts, advantages, max_tokens, *, old=False):
    """(metrics, flat gradient, micro-batch count) of one optimizer step's backward passes."""
    mbs = make_microbatches(rollouts, advantages, max_tokens=max_tokens, pad_id=learner.pad_id)
    old_lp = Learner._score(learner, learner.scorer, mbs) if old else None
    model.zero_grad(set_to_none=True)
    metrics = learner.backward(mbs, old_lp)
    return metrics, torch.cat([p.grad.flatten() for p in model.parameters()]), len(mbs)


def test_mean_normalised_weights_scale_the_step_by_one_over_the_mean_weight(tiny):
    """Placement `loss` (the loss is linear in w): normalize=mean is the step of normalize=none divided
    by the step's mean weight, whatever the micro-batching, with no extra forward pass; weights from
    old log-probs (as when a batch is reused) give the same step."""
    model, tokenizer, cfg = tiny
    model = copy.deepcopy(model)
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=4, seed=5)
    advantages = torch.linspace(-1.5, 1.5, len(rollouts))
    plain, _ = _weights_learner(model, tokenizer, cfg, normalize="none")
    m_plain, g_plain, _ = _step_grad(plain, model, rollouts, advantages, 10**6)
    raw = m_plain["weights/mean"]
    assert m_plain["weights/raw_mean"] == raw and m_plain["weights/constant"] == 0.0 and 1.0 < raw < 1.4

    normed, calls = _weights_learner(model, tokenizer, cfg, normalize="mean")
    m_one, g_one, n_one = _step_grad(normed, model, rollouts, advantages, 10**6)
    m_many, g_many, n_many = _step_grad(normed, model, rollouts, advantages, 80)
    assert n_one == 1 and n_many >= 3 and calls == []  # no extra no-grad pass
    for m in (m_one, m_many):
        assert m["weights/mean"] == pytest.approx(1.0, abs=1e-6)
        assert m["weights/raw_mean"] == pytest.approx(raw, rel=1e-6)
        assert m["weights/max"] == pytest.approx(m_plain["weights/max"] / raw, rel=1e-6)
        assert m["loss/policy"] == pytest.approx(m_plain["loss/policy"] / raw, rel=1e-5, abs=1e-7)
        assert m["weights/frac_upper"] == m_plain["weights/frac_upper"]  # of the raw weights, at U = 1.4
    assert abs(m_one["loss/policy"] - m_many["loss/policy"]) < 1e-6
    assert torch.allclose(g_one, g_plain / raw, atol=1e-7, rtol=1e-4)
    assert torch.allclose(g_one, g_many, atol=1e-6, rtol=1e-4)
    normed.backward(make_microbatches(rollouts, advantages, max_tokens=80, pad_id=normed.pad_id))
    again = torch.cat([p.grad.flatten() for p in model.parameters()])  # accumulates: not rescaled
    assert torch.allclose(again, g_many + g_one, atol=1e-6, rtol=1e-4)
    m_old, g_old, _ = _step_grad(normed, model, rollouts, advantages, 80, old=True)
    assert m_old["weights/mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(m_old["loss/policy"] - m_one["loss/policy"]) < 1e-6
    assert torch.allclose(g_old, g_one, atol=1e-6, rtol=1e-4)


def test_mean_normalised_ratio_placement_equals_the_one_batch_loss_by_hand(tiny):
    """Placement `ratio` (w inside the clip: not linear in w): one extra no-grad pass gives the step's
    mean weight before the backward passes. The learner's step equals policy_loss on the whole batch
    with w / mean w, whatever the micro-batching."""
    from trgrpo.algo.losses import policy_loss
    from trgrpo.algo.token_weights import normalize_weights, token_weights

    model, tokenizer, cfg = tiny
    model = copy.deepcopy(model)
    rollouts = _rollouts(model, tokenizer, n_prompts=3, n=4, seed=5)
    advantages = torch.linspace(-1.5, 1.5, len(rollouts))
    normed, calls = _weights_learner(model, tokenizer, cfg, normalize="mean", placement="ratio")
    m_one, g_one, _ = _step_grad(normed, model, rollouts, advantages, 10**6)
    m_many, g_many, n_many = _step_grad(normed, model, rollouts, advantages, 80)
    assert calls == [1, n_many]  # one no-grad pass over each step's micro-batches
    assert m_one["weights/mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(m_one["loss/policy"] - m_many["loss/policy"]) < 1e-6
    assert torch.allclose(g_one, g_many, atol=1e-6, rtol=1e-4)

    mb = collate(rollouts, advantages, list(range(len(rollouts))), tokenizer.pad_token_id)
    w = cfg.algo.weights
    lp, _ = response_logprobs(model, mb, temperature=1.0, chunk=64)
    raw = token_weights(lp, shape=w.shape, alpha=w.alpha, tau=w.tau, mu=w.mu, lower=w.lower, upper=w.upper)
    weights = normalize_weights(raw, mb.response_mask)
    loss, _ = policy_loss(
        lp, None, mb.advantages, mb.response_mask, token_weights=weights, weight_placement="ratio"
    )
    model.zero_grad(set_to_none=True)
    loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert m_one["loss/policy"] == pytest.approx(float(loss.detach()), abs=1e-6)
    assert float((g_one - expected).norm() / expected.norm()) < 1e-4
