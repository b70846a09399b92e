"""Loading real datasets for tasks: a hub id, a `save_to_disk` folder, or local json/jsonl/parquet/csv files."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from trgrpo.config.schema import ConfigError, demo_slip_problem

log = logging.getLogger("trgrpo")

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_records(source: str, split: str, *, config: str | None = None, what: str = "dataset") -> list[dict]:
    """Rows of `split` as plain dicts. `what` names the config field in error messages."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(path))[split]
        elif path.is_dir() and (path / "dataset_info.json").exists():
            data = datasets.load_from_disk(str(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
            matching = [p for p in files if split in p.stem] or files
            if not matching:
                raise ConfigError(f"{what}={source!r}: no .json/.jsonl/.parquet/.csv files in that folder")
            data = datasets.load_dataset(
                _BUILDERS[matching[0].suffix], data_files=[str(p) for p in matching]
            )["train"]
        elif path.suffix in _BUILDERS:
            if not path.exists():
                raise ConfigError(f"{what}={source!r}: no such file")
            data = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path))["train"]
        elif source.startswith((".", "/", "~")):
            raise ConfigError(f"{what}={source!r}: no such file or folder")
        else:  # a hub id; works offline only when it is in the local cache
            data = datasets.load_dataset(source, config, split=split)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{what}={source!r} (split {split!r}) could not be loaded: {err}") from err
    return [dict(row) for row in data]


# Generated splits draw with replacement, so a few repeats are normal (math's default 128 held-out
# 1–2-digit sums hold ~123 distinct ones); below this share of the asked size the settings allow too
# few problems for the number to mean what it says, and the run warns.
FEW_DISTINCT = 0.9


def task_data(task, tc) -> tuple[list, list]:
    """The training pool and the held-out split. An empty one is a ConfigError naming the knobs; a
    split shorter than asked, or with under 90% distinct problems, is a warning."""
    train = list(task.dataset("train", tc.train_size, tc.data_seed))
    held_out = list(task.dataset("test", tc.eval_size, tc.data_seed))
    knobs = "widen the task's settings (e.g. task.generators[*].params) or lower task.train_size"
    if not train:
        raise ConfigError(
            f"task={tc.name}: the training pool is empty (task.train_size={tc.train_size}); {knobs}"
        )
    if not held_out:
        raise ConfigError(
            f"task={tc.name}: no held-out problems are left once the {len(train)} training problems are "
            f"removed (task.eval_size={tc.eval_size}): these settings allow too few distinct problems; {knobs}"
        )
    distinct = len({ex.prompt for ex in train})
    if distinct < FEW_DISTINCT * tc.train_size:
        log.warning(
            "task=%s: %d distinct training problems of task.train_size=%d", tc.name, distinct, tc.train_size
        )
    unique = len({ex.prompt for ex in held_out})  # generated splits may repeat a problem
    if len(held_out) < tc.eval_size or unique < FEW_DISTINCT * tc.eval_size:
        log.warning(
            "task=%s: the held-out split has %d distinct problems (%d in all) of task.eval_size=%d (the "
            "rest are in the training pool or the settings allow no more)",
            tc.name,
            unique,
            len(held_out),
            tc.eval_size,
        )
    return train, held_out


def check_demo_slip(share: float) -> None:
    problem = demo_slip_problem(share)
    if problem:
        raise ConfigError(problem)


def demo_slips(example, share: float) -> bool:
    """Whether this example's tiny-model demonstration makes the task's slip (task.demo_slip): a fixed
    draw per example, so every rebuild of the warm start agrees."""
    return share > 0 and random.Random(f"demo_slip:{example.id}:{example.prompt}").random() < share
