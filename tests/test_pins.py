"""pyproject.toml and environment.yml must pin the same versions of the same packages."""

import re
import tomllib

import yaml

from conftest import REPO


def _pins(requirements):
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;]+)\s*", req)
        assert match, f"not an exact pin: {req!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_pyproject_pins_are_exact_and_match_environment_yml():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    py_pins = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = _pins(pip_section)
    assert env_pins == py_pins
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_torch_is_pinned_with_the_rest():
    # Without torch in the same requirement set pip resolves a multi-GB CUDA build on CPU machines.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
