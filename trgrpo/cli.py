"""`trgrpo train | eval | plan | show | report | build-tiny`: the command line.

Each subcommand except `report` is a Hydra app over `trgrpo/conf/`, so every one takes the same
overrides (`task=logic algo=grpo trainer.steps=50`, `-m` for multirun). The composed DictConfig is
converted to the typed `Config` here and nothing below this module sees OmegaConf. User errors
(`ConfigError`, and Hydra's compose errors: an unknown group option, a misspelt key, a value of the
wrong type, an override it cannot parse) print one line and exit 2, a diverged run (`NonFiniteStep`)
or verifier workers that cannot start (`VerifierStartError`) exit 1 and Ctrl-C exits 130, all without a traceback. `trgrpo eval RUN_DIR|CHECKPOINT` takes the
checkpoint as its first argument, as `trgrpo report DIR` does (or as `eval.checkpoint=`).
`train -m` and `plan -m` go through trgrpo/sweep.py (a Hydra callback): every job is checked before the
first starts, and a sweep job that fails is recorded in its run.json while the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from trgrpo import sweep
from trgrpo.config.schema import Config, ConfigError, register, resolve

COMMANDS = ("train", "eval", "plan", "show", "report", "build-tiny")
USAGE = (
    f"usage: trgrpo {{{'|'.join(COMMANDS)}}} [key=value ...] (Hydra overrides; -m for multirun)\n"
    "       trgrpo eval RUN_DIR|CHECKPOINT [key=value ...]; trgrpo report DIR ..."
)
HIDDEN_PREFIX = "base_"  # the ConfigStore's schema entries (config.register): not choices to offer
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def to_config(cfg: DictConfig) -> Config:
    """The one conversion from Hydra's DictConfig to typed dataclasses (a missing value is a ConfigError)."""
    unknown = _unknown_keys(cfg)
    if unknown:  # `+trainer.stepz=3` composes (Hydra's `+` adds keys), but no code would read it
        raise ConfigError("; ".join(unknown))
    try:
        return resolve(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a config value"
        raise ConfigError(
            f"{key} has no value: set {key}=<value>, or pick a preset of its group (e.g. algo=tr_grpo)"
        ) from err
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).strip()) from err


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """A message for every key of a typed node that its dataclass does not have."""
    kind = OmegaConf.get_type(node)
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return []
    names = [f.name for f in dataclasses.fields(kind)]
    out = []
    for key in node:
        if key not in names:
            out.append(_not_a_key(f"{prefix}{key}", str(key), names))
        elif isinstance(child := OmegaConf.select(node, str(key), throw_on_missing=False), DictConfig):
            out += _unknown_keys(child, f"{prefix}{key}.")
    return out


def _not_a_key(full_key: str, key: str, valid: list[str]) -> str:
    """`trainer.stepz is not a config key; did you mean trainer.steps?` (or the valid keys there)."""
    section = full_key[: -len(key)]
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(section + name for name in close) + "?"
    else:
        hint = f"the keys{' of ' + section.rstrip('.') if section else ''} are: {', '.join(valid)}"
    return f"{full_key} is not a config key; {hint}"


def _choices(options: list[str] | None) -> str:
    return ", ".join(o for o in options or () if not o.startswith(HIDDEN_PREFIX))


def compose_message(err: Exception) -> str:
    """One line for an error Hydra raises while composing the config, naming the field (and, for a
    group, its choices). Unknown kinds fall back to Hydra's own message on one line."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such {group.rsplit('/', 1)[-1]}; choose one of: {_choices(err.options)}"
    if isinstance(err, OverrideParseException):
        reason = "; ".join(
            line.strip()
            for line in err.message.splitlines()
            if line.strip() and not line.startswith(("Error parsing override", "See https://"))
        )
        if "=" not in err.override:
            reason = "an override is key=value"
        return f"cannot parse the override {err.override!r} ({reason}); see {GRAMMAR}"
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        kind = cause.object_type
        valid = [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []
        return _not_a_key(str(cause.full_key), str(cause.key), valid)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {cause.msg.splitlines()[0] if cause.msg else cause}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    return " ".join(lines)


def _checkpoint_argument(rest: list[str]) -> list[str]:
    """`trgrpo eval RUN_DIR|CHECKPOINT ...`: a first argument that is not an override (no `=`, no
    leading -, + or ~) must be an existing path and becomes `eval.checkpoint=<path>`."""
    if not rest or "=" in rest[0] or rest[0].startswith(("-", "+", "~")):
        return rest
    path, others = rest[0], rest[1:]
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"{path} does not exist: give a run folder, a checkpoint folder or a model folder "
            "(trgrpo eval RUN_DIR|CHECKPOINT [key=value ...])"
        )
    if any(arg.startswith("eval.checkpoint=") for arg in others):
        raise ConfigError(f"the checkpoint is given twice: as {path} and as eval.checkpoint=; keep one")
    # Hydra's quoted strings: a quote, and backslashes before a quote or at the end, are escaped
    quoted = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), path)
    return [f"eval.checkpoint='{quoted}'", *others]


def check_experiment(choices=None) -> None:
    """`experiment=<name>` is an optional group: Hydra skips a name it cannot find without a word.
    `choices`: a composed config's hydra.runtime.choices (default: the running job's)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    name = (HydraConfig.get().runtime.choices if choices is None else choices).get("experiment")
    if name is None:
        return
    options = GlobalHydra.instance().config_loader().get_group_options("experiment")
    if name not in options:
        raise ConfigError(f"experiment={name}: no such experiment; choose one of: {_choices(options)}")


def _log_to_files(err: BaseException, trace: bool = False) -> None:
    """Record an error in the run's log file (with its traceback if `trace`), not on the console
    (stderr gets it once, below)."""
    exc_info = (type(err), err, err.__traceback__) if trace else None
    record = logging.LogRecord("trgrpo", logging.ERROR, __file__, 0, "%s", (err,), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _hydra_app(name: str, body: Callable[[Config, DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def app(cfg: DictConfig) -> None:
        try:
            check_experiment()
            body(to_config(cfg), cfg)
        except Exception as err:
            if name == "train" and sweep.STATE.active:  # a sweep job: recorded, and the sweep goes on
                _log_to_files(err, trace=not isinstance(err, ConfigError))
                sweep.job_failed(name, err, 2 if isinstance(err, ConfigError) else 1)
                return
            if isinstance(err, ConfigError):
                _log_to_files(err)
                print(f"trgrpo {name}: error: {err}", file=sys.stderr)
                sys.exit(2)
            # not a compose error, whatever its type: `main` lets it through
            err.trgrpo_body = True  # type: ignore[attr-defined]
            raise
        except KeyboardInterrupt:
            if sweep.job_interrupted():  # a parallel sweep's job: the sweep's process ends it
                return
            print(f"trgrpo {name}: interrupted{sweep.resume_hint()}", file=sys.stderr)
            sys.exit(130)

    return app


def _train(cfg: Config, raw: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from trgrpo.learner.learner import NonFiniteStep
    from trgrpo.tasks.verify_pool import VerifierStartError
    from trgrpo.train import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if sweep.STATE.active and sweep.prepare_job(cfg, run_dir):  # finished earlier: skipped
        return
    try:
        run(cfg, run_dir)
    # training diverged, or its verifiers cannot start: a result or a setting to report, not a bug
    except (NonFiniteStep, VerifierStartError) as err:
        if sweep.STATE.active:
            raise  # recorded by the job wrapper; the sweep goes on
        _log_to_files(err)
        print(f"trgrpo train: error: {err} (run: {run_dir})", file=sys.stderr)
        sys.exit(1)


def _eval(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.evaluate import run_eval
    from trgrpo.tasks.verify_pool import VerifierStartError

    try:
        run_eval(cfg)
    except VerifierStartError as err:
        _log_to_files(err)
        print(f"trgrpo eval: error: {err}", file=sys.stderr)
        sys.exit(1)


def _plan(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.config.plan import print_plan

    print_plan(cfg)


def _show(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.show import show_task

    show_task(cfg)


def _build_tiny(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.models.tiny import build_tiny, tiny_seed
    from trgrpo.run import host

    host.configure(cfg.trainer)
    path = build_tiny(cfg.model.tiny, cfg.task, seed=tiny_seed(cfg.model.tiny, cfg.seed), force=True)
    print(f"tiny model ready: {path}")


BODIES = {"train": _train, "eval": _eval, "plan": _plan, "show": _show, "build-tiny": _build_tiny}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"trgrpo: error: unknown command {command!r}; valid: {', '.join(COMMANDS)}\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    if command == "report":
        from trgrpo.report.tables import main as report_main

        return report_main(rest)
    if command == "eval":
        try:
            rest = _checkpoint_argument(rest)
        except ConfigError as err:
            print(f"trgrpo eval: error: {err}", file=sys.stderr)
            return 2
    register()
    sys.argv = [f"trgrpo {command}", *rest]
    if command in ("train", "plan"):  # a multirun is checked whole before its first job (trgrpo/sweep.py)
        target = "hydra.callbacks.trgrpo_sweep"
        sys.argv += [f"+{target}._target_=trgrpo.sweep.SweepCheck", f"+{target}.command={command}"]
    # plan/show/eval never write a run directory of their own.
    if command in ("plan", "show", "build-tiny"):
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled"]
    # Hydra prints its own compose errors (several lines, exit 1) unless HYDRA_FULL_ERROR is set, in
    # which case it raises them: set it, and turn them into one line here (a user who set it keeps
    # Hydra's full traceback).
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_app(command, BODIES[command])()
    except sweep.SweepStop as stop:  # the sweep's check or summary is printed
        return stop.code
    except KeyboardInterrupt:  # outside a job (e.g. while a sweep's jobs are checked)
        print(f"trgrpo {command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        if user_full_error == "1" or getattr(err, "trgrpo_body", False):
            raise
        print(f"trgrpo {command}: error: {compose_message(err)}", file=sys.stderr)
        return 2
    finally:
        sweep.reset()
        if user_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error
    return 0


if __name__ == "__main__":
    sys.exit(main())
