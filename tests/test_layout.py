"""The package's layers, read from the source: which package may import which (lazy imports inside
functions included), and what lives at the top level. DESIGN.md's layout, enforced."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trgrpo"

# The top level holds the commands and the loop; everything else lives in a package.
TOP_LEVEL = {"__init__", "__main__", "cli", "train", "evaluate", "show", "sweep", "sweep_check"}

# package → the packages of ours it must never import (at module level or inside a function).
FORBIDDEN = {
    "algo": "all",  # pure tensor functions
    "config": {"learner", "rollout", "report", "train", "evaluate", "cli", "sweep"},
    "run": {"learner", "rollout", "models", "tasks", "report", "train", "evaluate", "cli", "sweep"},
    "models": {"learner", "rollout", "report", "train", "evaluate", "cli"},
    "tasks": {"models", "learner", "rollout", "report", "train", "evaluate", "cli"},
    "rollout": {"learner", "report", "train", "evaluate", "cli"},
    "learner": {"rollout", "tasks", "report", "train", "evaluate", "cli"},
    "report": {"models", "learner", "rollout", "tasks", "train", "evaluate", "cli"},
}


def _imports(path: Path) -> set[str]:
    """The trgrpo subpackages/modules one file imports, as their first component after `trgrpo.`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "trgrpo":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from trgrpo import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("trgrpo."))
    return found


def test_top_level_holds_only_the_commands_and_the_loop():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == TOP_LEVEL


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_layers_above_it(package):
    forbidden = FORBIDDEN[package]
    offending = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        imported = _imports(path) - {package, "conf"}
        bad = imported if forbidden == "all" else imported & forbidden
        if bad:
            offending.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert not offending, offending


def test_import_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from trgrpo.learner import fsdp\n    import trgrpo.rollout.base\n")
    assert _imports(module) == {"learner", "rollout"}


def test_every_task_has_a_config_schema_and_an_implementation():
    from trgrpo.config.schema import TASK_CONFIGS
    from trgrpo.tasks import TASKS

    assert set(TASKS) == set(TASK_CONFIGS)
