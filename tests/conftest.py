"""Shared fixtures: a private model cache, composed configs, and a tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from trgrpo.config.schema import Config, register, resolve

FAST = [
    "model.tiny.warmstart_steps=120",
    "model.tiny.hidden_size=64",
    "model.tiny.heads=2",
    "model.tiny.layers=2",
    "model.tiny.intermediate_size=128",
    "model.tiny.vocab_size=400",
    "task.train_size=256",
    # the plain demonstrations: short answers that fit rollout.max_new_tokens=24 below, so the fast
    # model earns format rewards and its groups have advantages (the column-worked default needs ~30)
    "task.demo_style=plain",
    "task.demo_slip=0",
    "task.eval_size=8",
    "task.format_reward=0.5",  # a gradient even while the tiny test model is rarely right
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "trainer.eval_samples=2",
    "trainer.eval_every=0",  # one evaluation, at the end (the default's step-0 one costs test time)
    "eval.ks=[1,2]",
    "trainer.verify_workers=0",
    "logger.console=false",
    # the tests' numerics and speed do not depend on the machine: fp32 (exact comparisons, bit-equal
    # resumes) on one torch thread (runs in this process would otherwise set the cores it may use)
    "trainer.precision=fp32",
    "trainer.fp32_matmul=highest",
    "trainer.threads=1",
    # eager decoding: compiling each test's fresh model shapes would cost more than it saves
    "rollout.compile=false",
]

# FAST for a test that picks its own task= (demo_style exists on task=math only)
FAST_ANY_TASK = [o for o in FAST if not o.startswith("task.demo_style")]


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip where torch sees no CUDA device (scripts/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_matmul_precision():
    """Runs in this process set torch's float32 matmul precision (trainer.fp32_matmul): the next test
    starts from torch's default again."""
    yield
    torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models built by tests go to a private cache, never to ~/.cache."""
    os.environ["TRGRPO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)


def make_cfg(*overrides: str) -> Config:
    register()
    with initialize_config_module("trgrpo.conf", version_base=None):
        return resolve(OmegaConf.to_object(compose("config", overrides=list(overrides))))


@pytest.fixture(scope="session")
def tiny(_model_cache):
    """(model, tokenizer, cfg) of the fast tiny math model."""
    from trgrpo.models.load import load_policy

    cfg = make_cfg(*FAST)
    model, tokenizer = load_policy(cfg.model, cfg.task, seed=0)
    return model, tokenizer, cfg


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


def join_ranks(rank: int, port: int, world: int, device: str = "cpu") -> torch.device:
    """In a spawned test worker: the torchrun environment for `rank` of `world`, one torch thread,
    then the default process group (gloo on CPU, nccl on CUDA). Returns the rank's device."""
    from trgrpo.run import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    return distributed.init(torch.device(device))


def make_learner(cfg, model, tokenizer, *, ref=None, shard: bool = False):
    """A Learner on `model` with the run's trainer/algo/rollout settings (no reference model unless
    `ref` is given)."""
    from trgrpo.learner.learner import Learner

    return Learner(
        model,
        ref,
        trainer=cfg.trainer,
        algo=cfg.algo,
        temperature=cfg.rollout.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        shard=shard,
    )
