"""Run folders are unique and owned: concurrent runs never share one, cleanup never deletes another's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from dynamo import rundir
from dynamo.rundir import OWNED_ENV, claim, release


def test_claim_retries_when_the_name_is_taken(tmp_path, monkeypatch):
    stamps = iter(["2026-01-01_00-00-00-000-aaaa", "2026-01-01_00-00-00-000-aaaa", "2026-01-01_00-00-00-000-bbbb"])
    monkeypatch.setattr(rundir, "stamp", lambda: next(stamps))
    first, second = claim(tmp_path, "m_q"), claim(tmp_path, "m_q")
    assert first.name == "2026-01-01_00-00-00-000-aaaa_m_q" and second.name == "2026-01-01_00-00-00-000-bbbb_m_q"


def test_release_deletes_only_an_owned_folder_without_a_record(tmp_path, monkeypatch):
    mine, other = claim(tmp_path, "mine"), claim(tmp_path, "other")
    monkeypatch.delenv(OWNED_ENV, raising=False)
    assert not release(mine), "nothing is owned until run.py claims it"
    monkeypatch.setenv(OWNED_ENV, str(mine))
    assert not release(other) and other.is_dir()
    (mine / "result.json").write_text("{}")
    assert not release(mine) and mine.is_dir(), "a folder holding a record is never deleted"
    (mine / "result.json").unlink()
    assert release(mine) and not mine.exists()


def _start(results, *overrides):
    cmd = [sys.executable, "run.py", f"results_dir={results}", "logger=none", "experiment=smoke", "quant=fp16",
           "eval=ppl", "eval.datasets=[code]", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_concurrent_runs_one_failing_keep_the_other_record(tmp_path):
    """The issue's reproduction: two runs started in the same second, one of them rejected. Both used
    to get one folder, and the rejected run's cleanup deleted the finished run's record."""
    procs = [_start(tmp_path), _start(tmp_path, "eval.max_windows=0")]
    outputs = [p.communicate(timeout=600) for p in procs]
    (out, err), (_, err_bad) = outputs
    assert [p.returncode for p in procs] == [0, 2], [o[1][-2000:] for o in outputs]
    assert "error: eval.max_windows=0 must be >= 1" in err_bad
    (printed,) = [line.removeprefix("record: ") for line in out.splitlines() if line.startswith("record: ")]
    assert json.loads(open(printed).read())["metrics"]["ppl"]["code"] > 1
    assert [str(p) for p in tmp_path.rglob("result.json")] == [printed]
    assert len(list(tmp_path.iterdir())) == 1, "the failed run left its folder behind"
