"""`make bench`'s case list: ours runs with its defaults (nothing pinned), TRL at its default threads in
both precisions, the ratio is against the faster TRL configuration, and the real model gets its own
work size. (The timings themselves live in docs/BENCHMARKS.md, never in a test.)"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench


def _args(**kw) -> Namespace:
    base = dict(
        warmup=1, steps=2, prompts=0, max_new_tokens=0, group_size=8, lr=1e-4, cases="", profile=False
    )
    return Namespace(**{**base, **kw})


def test_ours_runs_its_defaults_and_trl_its_default_threads():
    cases = bench.step_cases(Path("/m"), "llama-10m", _args())
    ours = cases["ours (defaults)"]["overrides"]
    assert not [o for o in ours if o.startswith(("trainer.threads", "trainer.precision"))]
    assert "trainer.prompts_per_step=16" in ours and "rollout.max_new_tokens=64" in ours
    assert cases["trl bf16 (its defaults)"]["threads"] is None and cases["trl fp32"]["threads"] is None
    assert cases["trl bf16 (its defaults)"]["bf16"] and not cases["trl fp32"]["bf16"]


def test_the_real_model_gets_its_own_work_size_unless_asked():
    cases = bench.step_cases(Path("/m"), "smollm2-135m", _args())
    assert (cases["trl fp32"]["prompts"], cases["trl fp32"]["max_new_tokens"]) == (8, 128)
    cases = bench.step_cases(Path("/m"), "smollm2-135m", _args(prompts=4, max_new_tokens=32))
    assert "trainer.prompts_per_step=4" in cases["ours (defaults)"]["overrides"]


def test_cases_are_picked_by_name_and_unknown_names_refused():
    cases = bench.step_cases(Path("/m"), "tiny", _args())
    assert list(bench.pick_cases(cases, "trl-fp32,ours")) == ["ours (defaults)", "trl fp32"]
    with pytest.raises(SystemExit):
        bench.pick_cases(cases, "ours,trl-bf17")


def test_ratio_is_against_the_faster_trl_configuration(capsys):
    row = dict(generate=1.0, verify=0.0, old_ref=0.0, update=1.0, sync=0.0, new_tokens=100, peak_rss=0,
               matmul_params=1, learner_tokens=1, fp32_rate=1e9, bf16_rate=2e9, steps=[2.0])  # fmt: skip
    runs = {
        "ours (defaults)": dict(row, step=2.0, precision="bf16", threads=2),
        "trl bf16 (its defaults)": dict(row, step=8.0, precision="bf16", threads=2),
        "trl fp32": dict(row, step=5.0, precision="fp32", threads=2),
    }
    bench.print_step_table({"llama-10m": runs}, _args(rounds=1))
    ours_line = next(line for line in capsys.readouterr().out.splitlines() if "ours (defaults)" in line)
    assert "| 0.40x |" in ours_line and "| bf16, 2 |" in ours_line


def test_a_failed_case_says_how_it_ended_past_the_warnings():
    killed = {"error": "Traceback\nRuntimeError: boom\n  warnings.warn(", "exit": -9}
    assert bench.error_summary(killed) == "killed by signal 9 (out of memory?): RuntimeError: boom"
    assert bench.error_summary({"error": "ValueError: bad", "exit": 1}) == "exit 1: ValueError: bad"
