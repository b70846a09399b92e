"""The learner on torch.distributed (FSDP2, gloo on CPU): two ranks compute the one-process update
(metrics and parameters), write a sharded checkpoint that one process loads and `transformers` reads,
and `torchrun -m trgrpo train` trains end to end with rank 0 alone logging, then resumes in one process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAST, join_ranks, make_cfg, make_learner

from trgrpo.algo.advantages import group_advantages
from trgrpo.learner import fsdp
from trgrpo.learner.learner import Learner
from trgrpo.models.chat import encode_prompt
from trgrpo.models.load import load_policy
from trgrpo.rollout.hf_engine import HFEngine
from trgrpo.run import checkpoint, distributed
from trgrpo.run.records import Example, Reward, Rollout, Sampling
from trgrpo.run.sampler import PromptSampler
from trgrpo.train import run

pytestmark = pytest.mark.distributed
WORLD = 2
# tr_grpo has a KL term (a sharded reference model) and token weights; two epochs score old log-probs
# and take two optimizer steps; the token budget makes several micro-batches per rank.
STEP = (
    *FAST,
    "algo=tr_grpo",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=0",
    "trainer.ppo_epochs=2",
    "trainer.max_tokens_per_microbatch=96",
    "trainer.share_prompts=false",  # sharded learners do not share prompt passes: the same float path
)
SPLIT = 12  # rank 0 steps on the first three groups, rank 1 on the last: uneven micro-batch counts
# One plain SGD step without clipping: the update is -lr × the rank-averaged gradient, a linear map, so
# the 2-rank and 1-process updates differ only by float32 reduction order, while a gradient summed
# instead of averaged over ranks doubles it. lr 1 makes the update the gradient itself: at lr 1e-3 the
# float32 rounding of p + update (one ulp of a parameter, ~1e-7) would be ~1e-4 of the update.
SGD_STEP = (*STEP, "trainer.ppo_epochs=1", "trainer.max_grad_norm=1e9")
SGD_LR = 1.0
# The same SGD step with tr_grpo_norm: one pass, so the mean weight is taken over both ranks' tokens
# after the backward passes and the sharded gradient is scaled by its inverse (Learner.backward).
NORM_STEP = (*SGD_STEP, "algo=tr_grpo_norm")


def _learner(cfg, model, tokenizer, *, shard: bool = False) -> Learner:
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return make_learner(cfg, model, tokenizer, ref=ref, shard=shard)


def _plain_sgd(learner: Learner, lr: float) -> Learner:
    """Swap AdamW for SGD at a constant lr (no momentum, no decay, no warm-up)."""
    params = [p for group in learner.optimizer.param_groups for p in group["params"]]
    learner.optimizer = torch.optim.SGD(params, lr=lr)
    learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda _: 1.0)
    return learner


def _batch(model, tokenizer, cfg) -> tuple[list[Rollout], torch.Tensor]:
    """Four groups of G rollouts sampled from the tiny model, with rewards that vary within groups."""
    g = cfg.rollout.group_size
    prompts = [f"{i} + {3 * i + 1} =" for i in range(4)]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    sampling = Sampling(temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens, n=g, seed=7)
    completions = HFEngine(model, tokenizer).generate(ids, sampling)
    rollouts = [
        Rollout(Example(str(k // g), prompts[k // g], "0"), tuple(ids[k // g]), c, Reward(float(k % 3 == 0)))
        for k, c in enumerate(completions)
    ]
    rewards = torch.tensor([ro.reward.score for ro in rollouts])
    return rollouts, group_advantages(rewards.view(-1, g)).view(-1)


def _worker(rank: int, port: int, cfg, sgd_cfg, norm_cfg, data: Path, out: Path) -> None:
    """One rank: a sharded learner steps on its share of the batch, then writes a sharded checkpoint;
    then a fresh sharded model takes one plain SGD step on the same share, and one with tr_grpo_norm."""
    join_ranks(rank, port, WORLD)
    rollouts, advantages = pickle.loads(data.read_bytes())
    model, tokenizer = load_policy(cfg.model, cfg.task, seed=cfg.seed)
    learner = _learner(cfg, model, tokenizer, shard=True)
    mine = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    metrics = learner.step(rollouts[mine], advantages[mine], group_size=cfg.rollout.group_size)
    params = {name: t.clone() for name, t in fsdp.full_parameters(model)}
    fsdp.save_sharded(
        out / "checkpoints",
        1,
        model=model,
        optimizer=learner.optimizer,
        tokenizer=tokenizer,
        trainer_state=checkpoint.trainer_state(learner, PromptSampler(8, 0), {}),
    )
    model, tokenizer = load_policy(sgd_cfg.model, sgd_cfg.task, seed=sgd_cfg.seed)
    learner = _plain_sgd(_learner(sgd_cfg, model, tokenizer, shard=True), SGD_LR)
    learner.step(rollouts[mine], advantages[mine], group_size=sgd_cfg.rollout.group_size)
    sgd_params = {name: t.clone() for name, t in fsdp.full_parameters(model)}
    model, tokenizer = load_policy(norm_cfg.model, norm_cfg.task, seed=norm_cfg.seed)
    learner = _plain_sgd(_learner(norm_cfg, model, tokenizer, shard=True), norm_cfg.trainer.lr)
    norm_metrics = learner.step(rollouts[mine], advantages[mine], group_size=norm_cfg.rollout.group_size)
    norm_params = {name: t.clone() for name, t in fsdp.full_parameters(model)}
    if rank == 0:
        saved = {"metrics": metrics, "params": params, "sgd_params": sgd_params}
        saved.update(norm_metrics=norm_metrics, norm_params=norm_params)
        torch.save(saved, out / "result.pt")
    distributed.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_one_process_update_and_a_checkpoint_one_process_loads(tiny, tmp_path):
    model, tokenizer, _ = tiny
    cfg, sgd_cfg = make_cfg(*STEP), make_cfg(*SGD_STEP)
    rollouts, advantages = _batch(model, tokenizer, cfg)
    data = tmp_path / "batch.pkl"
    data.write_bytes(pickle.dumps((rollouts, advantages)))
    norm_cfg = make_cfg(*NORM_STEP)
    mp.spawn(_worker, args=(_free_port(), cfg, sgd_cfg, norm_cfg, data, tmp_path), nprocs=WORLD)
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    one = copy.deepcopy(model)
    learner = _learner(cfg, one, tokenizer)
    expected = learner.step(rollouts, advantages, group_size=cfg.rollout.group_size)
    got = result["metrics"]
    assert got.keys() == expected.keys()
    assert expected["train/tokens"] > 50 and abs(expected["loss/policy"]) > 1e-4
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # The update itself, where it is linear in the gradient: one SGD step. Its largest entry sets the
    # scale; float32 reduction order (other micro-batch shapes, a gloo all-reduce) moves entries by
    # ≤ 1e-6 of it (measured 7e-7), and a gradient summed over the 2 ranks instead of averaged would move them by 1.0.
    sgd = _plain_sgd(_learner(sgd_cfg, copy.deepcopy(model), tokenizer), SGD_LR)
    sgd.step(rollouts, advantages, group_size=sgd_cfg.rollout.group_size)
    updates = {
        name: p.detach() - q.detach()
        for (name, p), q in zip(sgd.model.named_parameters(), model.parameters())
    }
    scale = max(float(u.abs().max()) for u in updates.values())
    assert scale > 1e-2  # a real step
    for name, q in model.named_parameters():
        sharded_update = result["sgd_params"][name] - q.detach()
        assert torch.allclose(sharded_update, updates[name], atol=1e-4 * scale, rtol=0), name
    # tr_grpo_norm: the 2-rank metrics (grad norm included) and SGD update are the one-process ones;
    # weights/mean is 1 and weights/raw_mean the mean over both ranks' tokens.
    norm = _plain_sgd(_learner(norm_cfg, copy.deepcopy(model), tokenizer), norm_cfg.trainer.lr)
    expected = norm.step(rollouts, advantages, group_size=norm_cfg.rollout.group_size)
    got = result["norm_metrics"]
    assert got.keys() == expected.keys() and expected["weights/mean"] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 + 1e-3 < expected["weights/raw_mean"] < 1.4
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for (name, p), q in zip(norm.model.named_parameters(), model.parameters()):
        sharded_update = result["norm_params"][name] - q.detach()
        assert torch.allclose(sharded_update, p.detach() - q.detach(), atol=1e-4 * scale, rtol=0), name

    # Two AdamW steps: Adam divides each entry by its own gradient scale, so an entry whose gradient is
    # near zero turns a reduction-order difference of ~1e-7 relative into a visible fraction of lr
    # (measured: up to 1.5e-3 × lr; with other samples one entry of 4,096 at 2e-2 × lr). Every entry
    # moves by up to ~lr per step, and a parameter that missed a micro-batch, a shard or a step is off
    # by that much in most entries: allowed are ≤ 0.1% of a parameter's entries beyond 1e-2 × lr, none
    # beyond 0.1 × lr (the SGD check above catches scaling).
    trained = result["params"]
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(one.parameters(), model.parameters()))
    lr = cfg.trainer.lr
    assert moved > lr  # two Adam steps at lr 1e-3: entries moved by up to ~2 lr
    for name, p in one.named_parameters():
        off = (trained[name] - p).detach().abs() / lr
        assert float(off.max()) < 0.1 and int((off > 1e-2).sum()) <= max(1, off.numel() // 1000), name

    step = tmp_path / "checkpoints" / "step_1"
    assert (step / checkpoint.SHARDED_DIR).is_dir() and checkpoint.list_checkpoints(step.parent) == [step]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(step)
    for name, p in exported.named_parameters():
        assert torch.equal(p, trained[name]), name
    fresh, _ = load_policy(cfg.model, cfg.task, seed=cfg.seed)
    resumed = _learner(cfg, fresh, tokenizer)
    checkpoint.restore(
        step, checkpoint.load_state(step), model=fresh, learner=resumed, sampler=PromptSampler(8, 0)
    )
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    for p, q in zip(one.parameters(), fresh.parameters()):
        want, have = learner.optimizer.state[p], resumed.optimizer.state[q]
        assert float(have["step"]) == float(want["step"]) == 2.0
        assert torch.allclose(have["exp_avg"], want["exp_avg"], atol=1e-7, rtol=1e-4)
        assert torch.allclose(have["exp_avg_sq"], want["exp_avg_sq"], atol=1e-9, rtol=1e-4)


def test_torchrun_trains_logging_from_rank_zero_and_one_process_resumes(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    args += ["-m", "trgrpo", "train", *FAST, "trainer.steps=2", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.count("run directory:") == 1, output[-4000:]  # rank 1 logs only warnings

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    for row in rows:
        for key in ("reward/mean", "loss/policy", "train/grad_norm", "rollout/response_len"):
            assert math.isfinite(row[key]), (key, row)
        assert row["rollout/drawn"] == 16.0  # both ranks' rollouts: 4 prompts × 4 samples
        assert row["train/tokens"] == pytest.approx(16 * row["rollout/response_len"])  # a global normaliser
    assert "eval/math/accuracy" in rows[-1]
    samples = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert Counter(samples) == {1: 4, 2: 4}
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["last_step"] == 2
    last = run_dir / "checkpoints" / "step_2"
    assert (last / checkpoint.SHARDED_DIR).is_dir() and (last / "model.safetensors").is_file()
    assert checkpoint.load_state(last)["optimizer"] is None  # in the shards

    run(make_cfg(*FAST, "trainer.steps=3", "trainer.resume=auto"), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and Path(status["resumed_from"]) == last


def test_config_checks_name_the_fields_under_torchrun(monkeypatch):
    from trgrpo.config.validation import problems

    monkeypatch.setenv("WORLD_SIZE", "3")
    found = " ".join(problems(make_cfg(*FAST)))  # 4 prompts over 3 ranks
    assert "trainer.prompts_per_step=4 is not divisible by the 3 torchrun processes" in found
    found = " ".join(problems(make_cfg(*FAST, "trainer.distributed=false")))
    assert "trainer.distributed=false under torchrun with WORLD_SIZE=3" in found
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert problems(make_cfg(*FAST)) == []
    assert problems(make_cfg(*FAST, "rollout=vllm")) == []  # one engine per rank
    found = " ".join(problems(make_cfg(*FAST, "rollout=vllm", "rollout.tensor_parallel_size=2")))
    assert "rollout.tensor_parallel_size=2 with rollout=vllm under torchrun is not supported yet" in found
    found = " ".join(problems(make_cfg(*FAST, "trainer.minibatches=4")))
    assert "gives 2 prompts to each of 2 ranks, not divisible by trainer.minibatches=4" in found
    monkeypatch.delenv("WORLD_SIZE")
    found = " ".join(problems(make_cfg(*FAST, "trainer.distributed=true")))
    assert "trainer.distributed=true needs a torchrun launch" in found
    assert "trainer.distributed='maybe' is not valid" in " ".join(
        problems(make_cfg(*FAST, "trainer.distributed=maybe"))
    )
