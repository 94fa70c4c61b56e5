"""scripts/bench_default_run.py --suite times both test tiers: the full suite (what CI runs) and the
fast tier (-m "not slow"), each under its own key of the JSON; other entries are kept."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO


@pytest.fixture
def bench(monkeypatch):
    """The script's module with its subprocess replaced: each command is recorded and gets `bench.status`."""
    spec = importlib.util.spec_from_file_location("bench_default_run", REPO / "scripts" / "bench_default_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.status, module.calls = 0, []

    def timed_command(cmd, env):
        module.calls.append(cmd[1:])
        summary = "3 passed in 1.00s" if module.status == 0 else "1 failed, 2 passed in 1.00s"
        return 1.5, subprocess.CompletedProcess(cmd, module.status, stdout=f"...\n{summary}\n", stderr="")

    monkeypatch.setattr(module, "timed_command", timed_command)
    return module


def _main(bench, monkeypatch, out, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_default_run.py", "--no-run", "--out", str(out), *argv])
    bench.main()


def test_suite_records_the_full_suite_and_the_fast_tier_and_keeps_the_rest(bench, monkeypatch, tmp_path):
    out = tmp_path / "default_run.json"
    out.write_text(json.dumps({"run": {"wall_s": 200.0}}))
    _main(bench, monkeypatch, out, "--suite", "--threads", "2")
    assert bench.calls == [["-m", "pytest", "-q"], ["-m", "pytest", "-q", "-m", "not slow"]]
    result = json.loads(out.read_text())
    assert result["run"] == {"wall_s": 200.0}, "an entry not measured this time is kept"
    assert result["suite"]["command"] == "python -m pytest -q"
    assert result["suite_fast"]["command"] == 'python -m pytest -q -m "not slow"'
    for key in ("suite", "suite_fast"):
        assert result[key]["wall_s"] == 1.5 and result[key]["summary"] == "3 passed in 1.00s"
        assert result[key]["threads"] == 2 and result[key]["measured_at"]


def test_a_failing_tier_is_one_error_line_and_writes_nothing(bench, monkeypatch, tmp_path):
    bench.status = 1
    out = tmp_path / "default_run.json"
    with pytest.raises(SystemExit, match=r"^error: python -m pytest -q failed: 1 failed, 2 passed"):
        _main(bench, monkeypatch, out, "--suite")
    assert not out.exists()


def test_the_fast_tier_leaves_out_a_registered_marker():
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers), "-m 'not slow' needs the slow marker registered"
