"""trainer.threads and trainer.precision resolved for the machine (trgrpo/run/host.py): `auto` threads from
the CPU affinity and cgroup quota, `auto` precision from a matmul probe (monkeypatched here: no test
depends on this machine's speed), explicit values winning, the errors that name the fields, and a run
recording what it resolved."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import FAST, make_cfg

from trgrpo.config.plan import plan_lines
from trgrpo.config.schema import ConfigError, TrainerConfig
from trgrpo.config.validation import problems
from trgrpo.learner.logprobs import Scorer
from trgrpo.rollout import decode_step
from trgrpo.run import checkpoint, host


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """configure sets torch's threads process-wide: give the next tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _rates(monkeypatch, fp32: float, bf16: float) -> None:
    monkeypatch.setattr(host, "matmul_rates", lambda *a, **k: {"fp32": fp32, "bf16": bf16})


def _fp32_probe(monkeypatch, highest: float, medium: float, error: float) -> None:
    probe = {"highest": highest, "medium": medium, "error": error}
    monkeypatch.setattr(host, "fp32_matmul_probe", lambda *a, **k: probe)


def _no_probe(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the matmul probe ran")

    monkeypatch.setattr(host, "matmul_rates", fail)


def _cores(monkeypatch, affinity: int, quota: float | None = None) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda *a: quota)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [(100.0, 300.0, "bf16"), (150.0, 80.0, "fp32"), (100.0, 105.0, "fp32")],  # the last within the margin
)
def test_auto_precision_follows_the_probe(monkeypatch, fp32, bf16, expected):
    _rates(monkeypatch, fp32, bf16)
    t = TrainerConfig(threads=1, precision="auto", reuse_host_memory=False)
    settings = host.configure(t, "cpu")
    assert t.precision == settings.precision == expected
    assert settings.gflops == {"fp32": fp32, "bf16": bf16}
    assert f"precision {expected} (auto: 512x512 matmul fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f}" in (
        settings.line
    )


@pytest.mark.parametrize("value", ["fp32", "bf16"])
def test_explicit_precision_wins_without_a_probe(monkeypatch, value):
    _no_probe(monkeypatch)
    t = TrainerConfig(threads=1, precision=value, reuse_host_memory=False)
    settings = host.configure(t, "cpu")
    assert (t.precision, settings.precision, settings.gflops) == (value, value, None)
    assert f"precision {value} (set)" in settings.line


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_asks_the_gpu(monkeypatch, supported, expected):
    _no_probe(monkeypatch)  # no CPU probe for a GPU run
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    t = TrainerConfig(threads=1, precision="auto", reuse_host_memory=False)
    assert host.configure(t, torch.device("cuda", 0)).precision == expected == t.precision


# ---------------------------------------------------------------------------------- float32 matmuls


@pytest.mark.parametrize(
    ("highest", "medium", "error", "expected"),
    [
        (150.0, 400.0, 8e-7, "medium"),  # faster and as accurate as float32 (oneDNN on an AMD EPYC)
        (150.0, 900.0, 4e-3, "highest"),  # faster because it rounds to bf16: refused
        (150.0, 160.0, 8e-7, "highest"),  # within the margin
    ],
)
def test_auto_fp32_matmul_follows_the_probe(monkeypatch, highest, medium, error, expected):
    _fp32_probe(monkeypatch, highest, medium, error)
    _rates(monkeypatch, 100.0, 300.0)
    t = TrainerConfig(threads=1, precision="auto", fp32_matmul="auto", reuse_host_memory=False)
    settings = host.configure(t, "cpu")
    assert t.fp32_matmul == settings.fp32_matmul == torch.get_float32_matmul_precision() == expected
    assert (
        f"float32 matmuls {expected} (auto: 512x512 medium {medium / highest:.2f}x highest's rate, "
        f"relative error {error:.1e})" in settings.line
    )


def test_explicit_fp32_matmul_wins_and_gpus_keep_float32(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the float32 matmul probe ran")

    monkeypatch.setattr(host, "fp32_matmul_probe", fail)
    t = TrainerConfig(threads=1, precision="fp32", fp32_matmul="medium", reuse_host_memory=False)
    assert host.configure(t, "cpu").fp32_matmul == "medium" == torch.get_float32_matmul_precision()
    assert "float32 matmuls medium (set)" in host.configure(t, "cpu").line
    assert host.auto_fp32_matmul(torch.device("cuda", 0)) == ("highest", "float32 on cuda")  # TF32 there


def test_fp32_matmul_probe_measures_speed_and_error_and_leaves_the_setting():
    torch.set_float32_matmul_precision("high")
    probe = host.fp32_matmul_probe(size=64, repeats=2)
    assert torch.get_float32_matmul_precision() == "high"
    assert set(probe) == {"highest", "medium", "error"}
    assert probe["highest"] > 0 and probe["medium"] > 0
    assert 0 <= probe["error"] < 1e-2  # float32 (~1e-7) or, where medium rounds to bf16, ~1e-3


def test_probe_measures_both_dtypes_with_a_positive_rate():
    rates = host.matmul_rates(size=64, repeats=2)
    assert set(rates) == {"fp32", "bf16"}
    assert all(r > 0 and r != float("inf") for r in rates.values()), rates


# -------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("affinity", "quota", "local", "expected"),
    [
        (8, None, None, 8),  # all the cores it may run on
        (8, 2.5, None, 3),  # a cgroup quota of 2.5 CPUs caps it (rounded up)
        (8, 0.5, None, 1),
        (2, 16.0, None, 2),  # a quota above the affinity does not raise it
        (8, None, "2", 4),  # two torchrun processes on the node share the cores
        (2, None, "4", 1),
        (16, None, "p4", 4),  # a sweep running 4 jobs at once: a quarter each
        (16, None, "2p3", 2),  # 2 torchrun processes in each of 3 parallel jobs: 16 // 6
    ],
)
def test_auto_threads_from_affinity_quota_and_torchrun(monkeypatch, affinity, quota, local, expected):
    _cores(monkeypatch, affinity, quota)
    monkeypatch.delenv("TRGRPO_SWEEP_PARALLEL", raising=False)
    if local is not None:
        ranks, _, parallel = local.partition("p")
        if ranks:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        if parallel:
            monkeypatch.setenv("TRGRPO_SWEEP_PARALLEL", parallel)
    assert host.auto_threads() == expected


def test_usable_cores_without_an_affinity_api(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda *a: None)
    assert host.usable_cores() == 6


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "250000 100000\n"}, 2.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert host.cgroup_cpu_quota(tmp_path) == expected


def test_auto_threads_are_set_and_written_back(monkeypatch):
    _cores(monkeypatch, 3)
    probed_with = []  # the probe runs with the threads just chosen
    monkeypatch.setattr(
        host,
        "matmul_rates",
        lambda: probed_with.append(torch.get_num_threads()) or {"fp32": 2.0, "bf16": 1.0},
    )
    t = TrainerConfig(reuse_host_memory=False)  # the schema's defaults: auto, auto
    settings = host.configure(t, "cpu")
    assert probed_with == [3]
    assert t.threads == settings.threads == torch.get_num_threads() == 3
    assert settings.line.startswith("host: torch threads 3 (auto: 3 usable cores), precision fp32 (auto: ")


@pytest.mark.parametrize(("value", "expected"), [(2, 2), ("2", 2)])
def test_explicit_threads_win(monkeypatch, value, expected):
    _cores(monkeypatch, 8)
    t = TrainerConfig(threads=value, precision="fp32", reuse_host_memory=False)
    assert host.configure(t).threads == torch.get_num_threads() == expected == t.threads


def test_zero_threads_keep_torchs_default(monkeypatch):
    torch.set_num_threads(1)
    t = TrainerConfig(threads=0, precision="fp32", reuse_host_memory=False)
    settings = host.configure(t)
    assert settings.threads == t.threads == 1
    assert "(0: torch's default)" in settings.line


# ----------------------------------------------------------------------------------- config and plan


def test_defaults_are_auto_and_numbers_compose_as_ints():
    t = make_cfg().trainer
    assert (t.threads, t.precision, t.fp32_matmul) == ("auto", "auto", "auto")
    assert make_cfg("trainer.threads=4").trainer.threads == 4
    assert problems(make_cfg("trainer.threads=4", "trainer.precision=bf16")) == []
    assert problems(make_cfg("trainer.threads=0", "trainer.precision=fp32")) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.threads=-3", "trainer.threads=-3 is not valid; choose one of: auto, a number ≥ 1, 0"),
        ("trainer.threads=many", "trainer.threads='many' is not valid; choose one of: auto, a number ≥ 1"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not valid; choose one of: auto, fp32, bf16"),
        (
            "trainer.fp32_matmul=tf32",
            "trainer.fp32_matmul='tf32' is not valid; choose one of: auto, highest, medium",
        ),
    ],
)
def test_invalid_values_are_one_line_errors(override, message):
    cfg = make_cfg(override)
    found = [p for p in problems(cfg) if p.startswith(override.split("=")[0])]
    assert len(found) == 1 and found[0].startswith(message) and "\n" not in found[0], found
    with pytest.raises(ConfigError, match=message.split(";")[0].replace("(", r"\(")):
        host.configure(cfg.trainer)  # eval and build-tiny call it without validate


def test_plan_shows_the_settings():
    lines = plan_lines(make_cfg())
    threads = next(line for line in lines if line.split()[:1] == ["threads"])
    precision = next(line for line in lines if line.split()[:1] == ["precision"])
    assert f"auto (resolved at start: {host.auto_threads()} here" in threads
    assert "auto (resolved at start: bf16 " in precision
    assert any("float32 matmuls" in line and "auto (resolved at start: medium " in line for line in lines)
    assert any(
        line.split()[:2] == ["decode", "step"] and "torch.compile'd on a CPU with" in line for line in lines
    )
    (decode,) = [
        line
        for line in plan_lines(make_cfg("rollout.compile=false"))
        if line.split()[:2] == ["decode", "step"]
    ]
    assert decode.split()[2:] == ["eager", "(rollout.compile=false)"]
    lines = plan_lines(make_cfg("trainer.threads=2", "trainer.precision=fp32"))
    assert any(line.split() == ["threads", "2"] for line in lines)
    assert any(line.split() == ["precision", "fp32"] for line in lines)


# ------------------------------------------------------------------------------------------------ run


def test_a_run_records_the_resolved_values(monkeypatch, tmp_path, caplog):
    from trgrpo.train import run

    _cores(monkeypatch, 1)
    _rates(monkeypatch, 100.0, 300.0)
    _fp32_probe(monkeypatch, 150.0, 400.0, 8e-7)
    used = set()  # the precision the learner's forwards ran in
    forward = Scorer.forward
    monkeypatch.setattr(
        Scorer, "forward", lambda self, mb, **kw: used.add(kw["precision"]) or forward(self, mb, **kw)
    )
    compiled = []  # decode steps through the compiled layers (rollout.compile=auto: a C++ compiler here)
    layer = decode_step._compiled_layer
    monkeypatch.setattr(decode_step, "_compiled_layer", lambda: compiled.append(1) or layer())
    monkeypatch.setattr(decode_step, "_compile_failed", [])
    monkeypatch.delenv("CXX", raising=False)
    compiler = shutil.which("g++")
    cfg = make_cfg(
        *FAST,
        "trainer.steps=1",
        "trainer.threads=auto",
        "trainer.precision=auto",
        "trainer.fp32_matmul=auto",
        "rollout.compile=auto",
    )
    with caplog.at_level(logging.INFO, logger="trgrpo"):
        run(cfg, tmp_path)
    assert used == {"bf16"}
    assert bool(compiled) == (compiler is not None) and not decode_step._compile_failed
    status = json.loads((tmp_path / "run.json").read_text())
    assert (status["threads"], status["precision"], status["fp32_matmul"]) == (1, "bf16", "medium")
    assert status["decode_compile"] == ("true" if compiler else "false")
    assert status["matmul_gflops"] == {"fp32": 100.0, "bf16": 300.0}
    saved = (tmp_path / ".hydra" / "config.yaml").read_text()  # written by run without Hydra
    assert "  threads: 1\n" in saved and "  precision: bf16\n" in saved and "  fp32_matmul: medium\n" in saved
    assert f"  compile: '{status['decode_compile']}'\n" in saved
    state = checkpoint.load_state(tmp_path / "checkpoints" / "step_1")  # the config resume checks
    assert (state["config"]["trainer"]["threads"], state["config"]["trainer"]["precision"]) == (1, "bf16")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("host: ")]
    assert lines == [
        "host: torch threads 1 (auto: 1 usable cores), precision bf16 "
        "(auto: 512x512 matmul fp32 100.0 GFLOP/s, bf16 300.0 GFLOP/s), float32 matmuls medium "
        "(auto: 512x512 medium 2.67x highest's rate, relative error 8.0e-07)"
    ]


@pytest.mark.parametrize(
    ("affinity", "free_gib", "expected"),
    [
        (16, 64, 16),  # one job per core where memory allows
        (16, 16, 5),  # a 16-core laptop with 16 GiB free: as many 3 GiB jobs as fit
        (2, 2, 1),  # never fewer than one
        (4, None, 4),  # memory unknown: the cores decide
    ],
)
def test_sweep_jobs_from_cores_and_free_memory(monkeypatch, tmp_path, affinity, free_gib, expected):
    _cores(monkeypatch, affinity, None)
    meminfo = tmp_path / "meminfo"
    if free_gib is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {free_gib * 2**20} kB\n")
    read = host.available_memory
    monkeypatch.setattr(host, "available_memory", lambda: read(meminfo))
    assert host.sweep_jobs() == expected
