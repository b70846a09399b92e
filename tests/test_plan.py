"""`trgrpo plan` and config validation: the printed arithmetic, normalisers and weight curves of every
preset; every combination of config groups composes and validates; `problems` names what to change."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from conftest import make_cfg

import trgrpo.conf
from trgrpo.config.plan import PROBES, microbatches, numbers, plan_lines, print_plan
from trgrpo.config.schema import ConfigError
from trgrpo.config.validation import problems

CONF = Path(trgrpo.conf.__file__).parent
TOKEN_MEAN = "Σ over all response tokens of the optimizer step / their count"
SEQ_MEAN = "mean over the step's sequences of each sequence's token mean"
CONSTANT = "weights are constant (w = 1 for every p): this is GRPO with a scale"
RATIO_CAVEAT = "tokens with w > 1+ε_high and A > 0 get no gradient at r = 1"


def options(group: str) -> list[str]:
    """The presets of a config group: its YAML files (the base_* schemas are not presets)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def row(lines: list[str], key: str) -> str:
    """The value of the plan row `key` (exactly one such row)."""
    found = [line.strip()[len(key) :].strip() for line in lines if line.strip().startswith(key + "  ")]
    assert len(found) == 1, f"{len(found)} rows {key!r} in:\n" + "\n".join(lines)
    return found[0]


def curve_of(lines: list[str]) -> dict[float, float]:
    return {float(p): float(w) for p, w in re.findall(r"w\(([\d.]+)\)=([\d.]+)", row(lines, "curve"))}


# ------------------------------------------------------------------------------------------ the plan


def test_default_plan_arithmetic_and_names():
    lines = plan_lines(make_cfg())
    assert row(lines, "task").startswith("math ")
    assert row(lines, "algo") == "tr_grpo"
    assert row(lines, "model").startswith("tiny: ")
    assert row(lines, "engine").startswith("hf ")
    assert row(lines, "prompts per step N") == "16"
    assert row(lines, "group size G") == "8"
    assert row(lines, "rollouts per step N·G") == "128"
    assert row(lines, "optimizer steps per step").startswith("1 ")
    assert row(lines, "optimizer steps in total").startswith("200 ")
    assert row(lines, "worst-case tokens per rollout") == "prompt + rollout.max_new_tokens = prompt + 48"
    # 8192 // (64 + 48) = 73 rows per micro-batch → ceil(128 / 73) = 2 micro-batches
    assert row(lines, "micro-batches (prompt ≤ 64)").startswith("2 per minibatch")
    assert row(lines, "clip range").startswith("[0.8, 1.2]")
    assert row(lines, "normaliser").startswith(TOKEN_MEAN)
    assert row(lines, "reference model").startswith("loaded")
    assert row(lines, "dynamic sampling") == "off"
    assert sorted(curve_of(lines)) == sorted(PROBES)
    assert not any(line.startswith(("WARNING", "PROBLEM")) for line in lines)
    assert lines[-1].startswith("config valid")


# algo → (normaliser prefix, {p: expected w}, row fragments)
PRESETS = {
    "grpo": (TOKEN_MEAN, {0.01: 1.0, 0.5: 1.0, 0.99: 1.0}, {"shape": "none: w ≡ 1"}),
    "tr_grpo": (TOKEN_MEAN, {0.01: 1.0, 0.05: 1.0, 0.2: 1.216, 0.3: 1.374, 0.5: 1.4, 0.99: 1.4}, {}),
    "dr_grpo": (
        "Σ / (agg_max_len or rollout.max_new_tokens × sequences) = Σ / (48 × 128)",
        {0.01: 1.0, 0.99: 1.0},
        {"advantages": "Â = R − mean_g R", "KL term": "off", "reference model": "not loaded"},
    ),
    "dapo": (TOKEN_MEAN, {0.5: 1.0}, {"clip range": "[0.8, 1.28]", "dynamic sampling": "on: "}),
    "ar": (TOKEN_MEAN, {0.01: 0.703, 0.5: 0.85, 0.99: 0.997}, {"shape": "linear: w = 0.3·p + 0.7"}),
    "tr_grpo_reverse": (TOKEN_MEAN, {0.01: 1.4, 0.5: 1.4, 0.9: 1.0, 0.99: 1.0}, {"shape": "reverse: "}),
    "tr_grpo_norm": (
        TOKEN_MEAN,
        {0.01: 1.0, 0.05: 1.0, 0.2: 1.216, 0.3: 1.374, 0.5: 1.4, 0.99: 1.4},  # before normalisation
        {"normalize": "mean: w ← w / mean w over the optimizer step's response tokens"},
    ),
}


def test_every_algo_preset_is_covered():
    assert sorted(PRESETS) == options("algo")


@pytest.mark.parametrize("algo", sorted(PRESETS))
def test_plan_of_each_algo_preset(algo):
    normaliser, weights, fragments = PRESETS[algo]
    lines = plan_lines(make_cfg(f"algo={algo}"))
    assert row(lines, "algo") == algo
    assert row(lines, "normaliser").startswith(normaliser)
    curve = curve_of(lines)
    for p, w in weights.items():
        assert curve[p] == pytest.approx(w, abs=5e-4), (p, curve)
    for key, fragment in fragments.items():
        assert fragment in row(lines, key)
    assert not any(CONSTANT in line for line in lines)  # no preset is GRPO in disguise
    assert lines[-1].startswith("config valid")


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ([], "none: w as the formula gives it (the paper)"),
        (["algo=tr_grpo_norm"], "divided by the mean after the backward passes (no extra cost)"),
        (["algo=tr_grpo_norm", "trainer.ppo_epochs=2"], "from the old log-probs scored before the updates"),
        (
            ["algo=tr_grpo_norm", "algo.weights.placement=ratio"],
            "one extra no-grad forward per optimizer step",
        ),
        (["algo=tr_grpo_norm", "algo.weights.weight_kl=false"], "one extra no-grad forward"),
        (["algo=grpo", "algo.weights.normalize=mean"], "mean (no effect: algo.weights.shape=none"),
    ],
)
def test_plan_explains_weight_normalisation_and_its_cost(overrides, text):
    assert text in row(plan_lines(make_cfg(*overrides)), "normalize")


def test_tr_grpo_reference_points_read_as_the_paper_reading():
    curve = curve_of(plan_lines(make_cfg("algo=tr_grpo")))
    assert curve[0.05] == 1.0
    assert curve[0.2] == pytest.approx(1.22, abs=0.005)
    assert curve[0.5] == 1.4


def test_literal_tau_gives_the_constant_weight_warning():
    lines = plan_lines(make_cfg("algo=tr_grpo", "algo.weights.tau=9"))
    assert set(curve_of(lines).values()) == {1.0}
    assert next(line for line in lines if CONSTANT in line).startswith("WARNING: ")


def test_constant_weight_other_than_one_is_named():
    # lower = upper: the clip pins every weight to 1.3
    lines = plan_lines(make_cfg("algo.weights.lower=1.3", "algo.weights.upper=1.3"))
    assert any("weights are constant (w = 1.3 for every p): this is GRPO with a scale" in x for x in lines)


@pytest.mark.parametrize(
    ("overrides", "caveat"),
    [
        (["algo.weights.placement=ratio"], True),  # w reaches 1.4 > 1.2
        (["algo.weights.placement=ratio", "algo.clip_high=0.4"], False),  # 1.4 is not > 1.4
        (["algo.weights.placement=ratio", "algo.weights.upper=1.2"], False),
        (["algo.weights.placement=loss"], False),
        (["algo=grpo", "algo.weights.placement=ratio"], False),  # w ≡ 1
    ],
)
def test_ratio_placement_caveat(overrides, caveat):
    lines = plan_lines(make_cfg(*overrides))
    assert any(RATIO_CAVEAT in line for line in lines) == caveat


def test_ratio_placement_with_small_weights_warns_about_negative_advantages():
    lines = plan_lines(make_cfg("algo=ar", "algo.weights.placement=ratio"))  # w down to 0.7 < 0.8
    assert any("tokens with w < 1−ε_low and A < 0 get no gradient at r = 1" in line for line in lines)


def test_normalisers_of_the_other_aggregations():
    lines = plan_lines(make_cfg("algo.agg=seq-mean-token-mean", "trainer.minibatches=4"))
    assert row(lines, "normaliser") == f"{SEQ_MEAN} (32 sequences per optimizer step)"
    lines = plan_lines(make_cfg("algo=dr_grpo", "algo.agg_max_len=100", "trainer.minibatches=2"))
    assert row(lines, "normaliser").startswith(
        "Σ / (agg_max_len or rollout.max_new_tokens × sequences) = Σ / (100 × 64), L = algo.agg_max_len"
    )


def test_multi_turn_response_cap_and_dr_grpo_length_warning():
    lines = plan_lines(make_cfg("task=tool_qa", "algo=dr_grpo"))
    assert row(lines, "worst-case tokens per rollout").startswith(
        "prompt + task.max_response_tokens = prompt + 256"
    )
    assert any(line.startswith("WARNING: ") and "algo.agg_max_len=256" in line for line in lines)


def test_batch_arithmetic():
    cfg = make_cfg(
        "trainer.prompts_per_step=12",
        "rollout.group_size=4",
        "trainer.minibatches=3",
        "trainer.ppo_epochs=2",
        "trainer.steps=10",
        "trainer.max_tokens_per_microbatch=1000",
        "rollout.max_new_tokens=36",
    )
    num = numbers(cfg)
    assert num["rollouts_per_step"] == 48
    assert num["rollouts_per_minibatch"] == 16
    assert num["optimizer_steps_per_step"] == 6
    assert num["optimizer_steps_total"] == 60
    assert microbatches(cfg, 64) == (10, 2)  # 1000 // 100 = 10 rows; ceil(16 / 10) = 2
    assert microbatches(cfg, 1024) == (1, 16)  # one 1060-token rollout alone exceeds the budget
    lines = plan_lines(cfg)
    assert row(lines, "optimizer steps per step") == "6 (ppo_epochs 2 × minibatches 3)"
    assert row(lines, "old log-probs").startswith("recomputed")
    assert "one rollout alone exceeds the budget" in row(lines, "micro-batches (prompt ≤ 1024)")


def test_print_plan_prints_every_problem_then_raises(capsys):
    cfg = make_cfg("trainer.lr=-1", "algo.agg=mean", "rollout.group_size=1")
    with pytest.raises(ConfigError) as err:
        print_plan(cfg)
    out = capsys.readouterr().out
    for key in ("trainer.lr", "algo.agg", "rollout.group_size"):
        assert f"PROBLEM: {key}" in out
        assert key in str(err.value)
    assert "3 problem(s)" in out
    assert "rollouts per step N·G" in out  # the plan is printed too


def test_print_plan_of_a_valid_config_does_not_raise(capsys):
    print_plan(make_cfg())
    out = capsys.readouterr().out
    assert "w(0.2)=1.216" in out
    assert "config valid" in out


# ---------------------------------------------------------------------------------- every combination

GROUPS = ("task", "algo", "model", "rollout", "logger")
COMBINATIONS = [
    [f"{group}={name}" for group, name in zip(GROUPS, names)]
    for names in itertools.product(*(options(group) for group in GROUPS))
] + [[f"experiment={name}"] for name in options("experiment")]


def test_the_groups_have_presets():
    assert len(COMBINATIONS) >= 3 * 6 * 1 * 2 * 2


@pytest.mark.parametrize("overrides", COMBINATIONS, ids=lambda o: ",".join(x.split("=")[1] for x in o))
def test_every_combination_composes_and_validates(overrides):
    cfg = make_cfg(*overrides)
    assert problems(cfg) == []
    assert plan_lines(cfg)[-1].startswith("config valid")


@pytest.mark.parametrize("task", ["math", "logic", "tool_qa"])
def test_paper_overlays_hold_the_ar_lopti_recipe(task):
    """conf/experiment/paper_<task>: 64 prompts × 8, lr 1e-6, clip 0.2/0.24, k3 KL 0.001, token-mean,
    temperature 0.7, the non-degenerate TR-GRPO weight, a Qwen2.5 model on vLLM; GRPO by algo=grpo."""
    cfg = make_cfg(f"experiment=paper_{task}")
    assert cfg.task.name == task
    assert (cfg.trainer.prompts_per_step, cfg.rollout.group_size, cfg.trainer.lr) == (64, 8, 1e-6)
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.kl_coef) == (0.2, 0.24, 0.001)
    assert (cfg.algo.kl_estimator, cfg.algo.agg, cfg.rollout.temperature) == ("k3", "token-mean", 0.7)
    assert cfg.model.name.startswith("qwen2.5-") and cfg.rollout.engine == "vllm"
    assert cfg.task.max_new_tokens >= 512
    lines = plan_lines(cfg)
    assert row(lines, "rollouts per step N·G") == "512"
    assert curve_of(lines)[0.5] > curve_of(lines)[0.05]  # not the w ≡ 1 reading
    grpo = make_cfg(f"experiment=paper_{task}", "algo=grpo")
    assert grpo.algo.weights.shape == "none" and grpo.algo.clip_high == 0.24 and grpo.trainer.lr == 1e-6


def test_sweep_cpu_is_the_documented_grid():
    """conf/experiment/sweep_cpu (`make sweep`): 3 tasks × grpo/tr_grpo/tr_grpo_norm × 3 seeds, 50
    steps, eval at 0, 10, …, 50, one tiny base model per task shared by the seeds (README "Results")."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("trgrpo.conf", version_base=None):
        raw = compose("config", overrides=["experiment=sweep_cpu"], return_hydra_config=True)
    assert dict(raw.hydra.sweeper.params) == {
        "task": "math,logic,tool_qa",
        "algo": "grpo,tr_grpo,tr_grpo_norm",
        "seed": "0,1,2",
    }
    for seed in (0, 2):
        cfg = make_cfg("experiment=sweep_cpu", f"seed={seed}")
        assert (cfg.trainer.steps, cfg.trainer.eval_every, cfg.trainer.eval_at_start) == (50, 10, True)
        assert cfg.model.name == "tiny" and cfg.model.tiny.seed == 0


# ------------------------------------------------------------------------------------------ problems


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["algo.weights.alpha=0"], "algo.weights.alpha=0.0 must be > 0 for algo.weights.shape=sigmoid"),
        (["algo=tr_grpo_reverse", "algo.weights.alpha=-2"], "must be > 0 for algo.weights.shape=reverse"),
        (["algo=ar", "algo.weights.alpha=1.5"], "algo.weights.alpha=1.5 must be in [0, 1]"),
        (["algo.weights.lower=-1"], "algo.weights.lower=-1.0 must be ≥ 0"),
        (["algo.weights.tau=0"], "algo.weights.tau=0.0 must be > 0"),
        (
            ["algo.weights.normalize=max"],
            "algo.weights.normalize='max' is not valid; choose one of: none, mean",
        ),
        (["eval.size=0"], "eval.size=0 must be ≥ 1"),
        (["eval.ks=[]"], "eval.ks must list at least one k"),
        (["trainer.keep_last=-1"], "trainer.keep_last=-1 must be ≥ 0"),
        (["trainer.warmup_steps=-5"], "trainer.warmup_steps=-5 must be ≥ 0"),
        (["trainer.device=tpu"], "trainer.device='tpu' is not valid"),
        (["model.path=/nonexistent/model"], "model.path='/nonexistent/model' does not exist"),
        (["model.name=qwen"], "model=qwen needs model.path"),
        (["trainer.resume=/nonexistent/ckpt"], "trainer.resume='/nonexistent/ckpt' does not exist"),
        (["task.dataset=/nonexistent.jsonl"], "task.dataset='/nonexistent.jsonl' does not exist"),
        (["task.name=chess"], "task.name='chess' is not valid; choose one of: logic, math, tool_qa"),
        (["task=tool_qa", "task.min_hops=3"], "task.min_hops=3 and task.max_hops=2"),
        (["task=tool_qa", "task.corpus_path=/tmp"], "both task.questions_path and task.corpus_path"),
        (["task=logic", "task.path=./no-such-kk.jsonl"], "task.path='./no-such-kk.jsonl' does not exist"),
        (["logger.mode=cloud"], "logger.mode='cloud' is not valid"),
        (["task=logic", "task.demo_slip=1.5"], "task.demo_slip=1.5 must lie in [0, 1]"),
        (["task.demo_style=rows"], "task.demo_style='rows' is not valid; choose one of: columns, plain"),
        (["task.demo_style=plain"], "task.demo_slip=0.8 forgets carries in worked columns"),
        (["model.tiny.heads=3"], "model.tiny.hidden_size=128 must be a multiple of model.tiny.heads=3"),
        (["model.max_context=48"], "rollout.max_new_tokens=48 leaves no room for a prompt"),
    ],
)
def test_problems_name_the_field_to_change(overrides, fragment):
    found = problems(make_cfg(*overrides))
    assert any(fragment in message for message in found), found


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.resume=auto"],
        ["trainer.resume=null"],
        ["model.name=qwen", "model.path=Qwen/Qwen2.5-0.5B-Instruct"],  # a hub id is not checked here
        ["task.dataset=openai/gsm8k"],
        ["algo=ar", "algo.weights.alpha=0"],  # linear α = 0: w ≡ 1, valid (plan warns)
        ["trainer.device=cuda:1"],
    ],
)
def test_problems_accept_valid_values(overrides, tmp_path):
    assert problems(make_cfg(*overrides)) == []


def test_existing_local_paths_pass(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = make_cfg(
        f"trainer.resume={tmp_path}", f"task.dataset={tmp_path / 'data.jsonl'}", f"eval.checkpoint={tmp_path}"
    )
    assert problems(cfg) == []
