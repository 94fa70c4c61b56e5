"""scripts/dqs_compare.py end to end on the testbed: --quick, one domain, one budget, into a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow  # ~25 s of CPU: the testbed's BQ is built (analysis, GPTQ) before anything is measured
def test_quick_run_writes_the_record_table_and_figure(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/dqs_compare.py", "--model", "testbed-qwen-moe", "--quick",
                           "--domains", "math", "--budgets", "0.01", "--policies", "paper", "rows_cols", "lowrank",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "dqs_compare_testbed-qwen-moe.json").read_text())
    math = record["domains_report"]["math"]
    assert set(math["policies"]) | set(record["skipped"]) == {"paper", "rows_cols", "lowrank"}
    row = math["policies"]["rows_cols"]["0.01"]
    assert 0 < row["switch"]["extra_nbytes"] <= 0.01 * record["expert_fp16_nbytes"]
    assert row["realized"]["over_expected"] is not None and "gptq_ceiling" in math
    assert record["novel"] == ["math"] and record["bq_restored_bitwise"]
    table = (tmp_path / "dqs_compare_testbed-qwen-moe.md").read_text()
    assert record["command"] in table and "| math | rows_cols | 0.01 |" in table
    assert (tmp_path / "dqs_compare_testbed-qwen-moe.png").stat().st_size > 0
