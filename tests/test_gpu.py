"""The CUDA paths no CPU test reaches: bf16 autocast with bf16 attention, padding-free packed rows on
CUDA SDPA, the hf engine's sampler log-probs on CUDA, and FSDP2 over nccl. Marked `gpu`: they skip
where torch sees no CUDA device (conftest) and `scripts/gpu_check.sh` runs them on a GPU machine.
Tolerances are the CPU tests' widened for CUDA kernels (other reduction orders, bf16 attention);
none of these has run on a GPU yet, so a failure here may be a tolerance to revisit, with its value.
"""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAST, join_ranks, make_cfg, make_learner

from trgrpo.algo.advantages import group_advantages
from trgrpo.learner import fsdp
from trgrpo.learner.batch import collate, to_device
from trgrpo.learner.logprobs import response_logprobs
from trgrpo.models.chat import encode_prompt
from trgrpo.models.load import load_policy
from trgrpo.rollout import decode_step
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run import distributed
from trgrpo.run.records import Example, Reward, Rollout, Sampling

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
STEP = (
    *FAST,
    "algo=grpo",
    "algo.kl_coef=0",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=0",
    "trainer.share_prompts=false",
)


def _rollouts(
    model, tokenizer, *, n_prompts=3, n=4, seed=0, precision="fp32", compile=False
) -> list[Rollout]:
    """Sampled on the model's device; prompts of different lengths, rewards that vary in a group."""
    prompts = [f"What is {i} + {3 * i}?" + " Think." * i for i in range(n_prompts)]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    engine = HFEngine(model, tokenizer, precision=precision, compile=compile)
    comps = engine.generate(ids, Sampling(temperature=1.0, max_new_tokens=16, n=n, seed=seed))
    return [
        Rollout(Example(str(k // n), prompts[k // n], "0"), tuple(ids[k // n]), c, Reward(float(k % 2)))
        for k, c in enumerate(comps)
    ]


def _microbatch(rollouts, pad_id):
    mb = collate(rollouts, torch.zeros(len(rollouts)), list(range(len(rollouts))), pad_id)
    return to_device(mb, CUDA)


def _logprobs_and_grads(model, mb, weights, **kwargs):
    model.zero_grad(set_to_none=True)
    logprobs, _ = response_logprobs(model, mb, temperature=0.7, chunk=7, **kwargs)
    (logprobs * weights).sum().backward()
    return logprobs.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_the_engine_on_cuda_samples_what_the_learner_scores(tiny, compile, monkeypatch):
    """compiled: rollout.compile=true's decode step through inductor's triton kernels (auto keeps GPUs
    eager until this has passed on one)."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model).to(CUDA).eval()
    monkeypatch.setattr(decode_step, "_compile_failed", [])
    mb = _microbatch(_rollouts(model, tokenizer, seed=3, compile=compile), tokenizer.pad_token_id)
    assert not decode_step._compile_failed
    with torch.no_grad():
        learner, _ = response_logprobs(model, mb, temperature=1.0, chunk=64)
    diff = (learner - mb.sampler_logprobs).abs()[mb.response_mask]
    assert diff.numel() > 10
    assert diff.max() < 1e-3, float(diff.max())  # CPU: < 1e-4; a wrong token or position is ~1


def test_bf16_on_cuda_is_close_to_fp32(tiny):
    """On CUDA the whole body runs in bf16 under autocast, attention included (CPU keeps attention
    in float32); the head and log-softmax stay float32. CPU measured 0.025 max, 0.0015 mean."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model).to(CUDA).train()
    mb = _microbatch(_rollouts(model, tokenizer, seed=1), tokenizer.pad_token_id)
    weights = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(0)).to(CUDA)
    fp32, g32 = _logprobs_and_grads(model, mb, weights)
    bf16, g16 = _logprobs_and_grads(model, mb, weights, precision="bf16")
    diff = (fp32 - bf16).abs()[mb.response_mask]
    assert diff.max() > 0, "autocast had no effect: the bf16 path ran in float32"
    assert diff.max() < 0.15 and diff.mean() < 0.01, (float(diff.max()), float(diff.mean()))
    assert torch.isfinite(g16).all()
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_free_equals_padded_on_cuda(tiny, precision):
    """Packed rows (position ids restart, no mask) on CUDA SDPA: the padded forward's log-probs and
    gradients (fp32: to 1e-4, CPU 1e-5; bf16: to bf16 rounding)."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model).to(CUDA).train()
    mb = _microbatch(_rollouts(model, tokenizer, n=2, seed=4), tokenizer.pad_token_id)
    assert (mb.attention_mask == 0).any(), "no padding: the test would not show anything"
    weights = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(2)).to(CUDA)
    lp_a, g_a = _logprobs_and_grads(model, mb, weights, precision=precision)
    lp_b, g_b = _logprobs_and_grads(model, mb, weights, precision=precision, padding_free=True)
    m = mb.response_mask
    atol, rel = (1e-4, 1e-4) if precision == "fp32" else (0.1, 0.05)
    assert torch.allclose(lp_a[m], lp_b[m], atol=atol, rtol=0), float((lp_a - lp_b).abs()[m].max())
    assert float((g_a - g_b).norm() / g_a.norm()) < rel


def _nccl_worker(rank: int, port: int, cfgs, data: bytes, out: str) -> None:
    """One nccl rank: an fp32 and a bf16 (mixed-precision FSDP2) sharded step on the whole batch."""
    device = join_ranks(rank, port, 1, "cuda")
    assert torch.distributed.get_backend() == "nccl"
    rollouts, advantages = pickle.loads(data)
    result = {}
    for cfg in cfgs:
        model, tokenizer = load_policy(cfg.model, cfg.task, seed=cfg.seed, device=str(device))
        learner = make_learner(cfg, model, tokenizer, shard=True)
        metrics = learner.step(rollouts, advantages, group_size=cfg.rollout.group_size)
        params = {name: t.detach().cpu() for name, t in fsdp.full_parameters(model)}
        result[cfg.trainer.precision] = {"metrics": metrics, "params": params}
    torch.save(result, out)
    distributed.destroy()


def test_fsdp2_over_nccl_makes_the_unsharded_update(tiny, tmp_path):
    """One nccl rank: sharded fp32 metrics equal the unsharded step's; the bf16 step (parameters
    all-gathered in bf16, gradients reduced in fp32) is finite and moves the parameters."""
    model, tokenizer, _ = tiny
    cfgs = [make_cfg(*STEP, f"trainer.precision={p}") for p in ("fp32", "bf16")]
    g = cfgs[0].rollout.group_size
    rollouts = _rollouts(model, tokenizer, n_prompts=4, n=g, seed=7)
    advantages = group_advantages(torch.tensor([r.reward.score for r in rollouts]).view(-1, g)).view(-1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.pt"
    data = pickle.dumps((rollouts, advantages))
    mp.spawn(_nccl_worker, args=(port, cfgs, data, str(out)), nprocs=1)
    result = torch.load(out, weights_only=False)

    one = copy.deepcopy(model).to(CUDA)
    expected = make_learner(cfgs[0], one, tokenizer).step(rollouts, advantages, group_size=g)
    got = result["fp32"]["metrics"]
    assert got.keys() == expected.keys() and expected["train/grad_norm"] > 0
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for name, p in one.named_parameters():
        assert torch.allclose(result["fp32"]["params"][name], p.detach().cpu(), atol=1e-5, rtol=0), name
    bf16 = result["bf16"]
    assert all(torch.isfinite(torch.tensor(v)) for v in bf16["metrics"].values())
    moved = max(float((bf16["params"][n] - p.detach()).abs().max()) for n, p in model.named_parameters())
    assert moved > 1e-4  # Adam moves entries by up to ~lr (1e-3)
