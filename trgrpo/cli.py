"""`trgrpo train | eval | plan | show | report | build-tiny`: the command line.

Each subcommand except `report` is a Hydra app over `trgrpo/conf/`, so every one takes the same
overrides (`task=logic algo=grpo trainer.steps=50`, `-m` for multirun). The composed DictConfig is
converted to the typed `Config` here and nothing below this module sees OmegaConf. User errors
(`ConfigError`) print one message and exit 2, a diverged run (`NonFiniteStep`) exits 1 and Ctrl-C
exits 130, all without a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from trgrpo.config import Config, ConfigError, register, resolve

COMMANDS = ("train", "eval", "plan", "show", "report", "build-tiny")
USAGE = f"usage: trgrpo {{{'|'.join(COMMANDS)}}} [key=value ...] (Hydra overrides; -m for multirun)"


def to_config(cfg: DictConfig) -> Config:
    """The one conversion from Hydra's DictConfig to typed dataclasses (a missing value is a ConfigError)."""
    try:
        return resolve(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a config value"
        raise ConfigError(
            f"{key} has no value: set {key}=<value>, or pick a preset of its group (e.g. algo=tr_grpo)"
        ) from err
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).strip()) from err


def _log_to_files(err: Exception) -> None:
    """Record a user error in the run's log file, not on the console (stderr gets it once, below)."""
    record = logging.LogRecord("trgrpo", logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _hydra_app(name: str, body: Callable[[Config, DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def app(cfg: DictConfig) -> None:
        try:
            body(to_config(cfg), cfg)
        except ConfigError as err:
            _log_to_files(err)
            print(f"trgrpo {name}: error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"trgrpo {name}: interrupted", file=sys.stderr)
            sys.exit(130)

    return app


def _train(cfg: Config, raw: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from trgrpo.learner.learner import NonFiniteStep
    from trgrpo.train import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except NonFiniteStep as err:  # training diverged: a result to report, not a bug to trace
        _log_to_files(err)
        print(f"trgrpo train: error: {err} (run: {run_dir})", file=sys.stderr)
        sys.exit(1)


def _eval(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.evaluate import run_eval

    run_eval(cfg)


def _plan(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.plan import print_plan

    print_plan(cfg)


def _show(cfg: Config, raw: DictConfig) -> None:
    from trgrpo.show import show_task

    show_task(cfg)


def _build_tiny(cfg: Config, raw: DictConfig) -> None:
    from trgrpo import host
    from trgrpo.models import build_tiny, tiny_seed

    host.configure(cfg.trainer.threads, cfg.trainer.reuse_host_memory)
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
        from trgrpo.report import main as report_main

        return report_main(rest)
    register()
    sys.argv = [f"trgrpo {command}", *rest]
    # plan/show/eval never write a run directory of their own.
    if command in ("plan", "show", "build-tiny"):
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled"]
    _hydra_app(command, BODIES[command])()
    return 0


if __name__ == "__main__":
    sys.exit(main())
