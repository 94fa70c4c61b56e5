"""The command lines: each [project.scripts] entry point is a package function taking argv, the thin script in
scripts/ calls the same function, and no script edits sys.path (dynamo is imported as installed)."""

from __future__ import annotations

import ast
import importlib
import tomllib

import pytest

from conftest import REPO

ENTRY_POINTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _main_import(path) -> str | None:
    """The module a thin script imports `main` from (None: the script is not a thin CLI)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
            return node.module
    return None


def test_every_entry_point_has_its_script_and_every_thin_script_its_entry_point():
    targets = {value.split(":")[0] for value in ENTRY_POINTS.values()}
    thin = {_main_import(p) for p in (REPO / "scripts").glob("*.py")} - {None}
    assert targets == thin, f"entry points without a script: {targets - thin}; scripts without one: {thin - targets}"
    assert all(value.endswith(":main") for value in ENTRY_POINTS.values())


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_takes_argv(name, capsys):
    module, _, attr = ENTRY_POINTS[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])  # argv reaches the parser: --help prints usage and exits 0 (not pytest's own argv)
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_no_script_edits_sys_path():
    editing = []
    for path in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                editing.append(path.name)
                break
    assert editing == [], "import dynamo as installed (pip install -e .)"
