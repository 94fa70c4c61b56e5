"""scripts/bench_switching.py runs end to end and writes the numbers it promises (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_switching_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "switching.json"
    proc = subprocess.run([sys.executable, "scripts/bench_switching.py", "--windows", "2", "--seqlen", "64",
                           "--switch-windows", "1", "--ppl-windows", "1", "--repeats", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["full_requant_s"] > 0 and 0 < report["cache"]["cache_over_expert_bytes"] < 0.02
    for mode in ("requant", "fp16"):
        domains = report["modes"][mode]["domains"]
        assert sorted(domains) == sorted(report["novel"])
        for d in domains.values():
            assert d["total_s"] == pytest.approx(d["profile_s"] + d["allocate_s"] + d["requant_s"], rel=0.01, abs=1e-4)
            assert d["bytes_moved"] == d["bytes_read"] + d["bytes_written"]
            assert d["switch_over_full_requant"] == pytest.approx(d["total_s"] / report["full_requant_s"], rel=0.01)
    adaptive = report["adaptive"]
    assert sorted(adaptive["domains"]) == sorted(report["novel"])
    for d in adaptive["domains"].values():
        assert d["total_s"] == pytest.approx(d["profile_s"] + d["select_s"] + d["write_s"], rel=0.01, abs=1e-4)
        assert 0 < d["extra_nbytes"] <= adaptive["budget_nbytes"]
    assert adaptive["median_switch_over_full_requant"] > 0
    for d in adaptive["domains"].values():  # the adaptive switch's own accounting: one MoE layer held at a time
        assert d["select_write_over_profile"] == pytest.approx((d["select_s"] + d["write_s"]) / d["profile_s"],
                                                               rel=0.01)
        assert len(d["held_nbytes_by_layer"]) > 0 and d["held_nbytes_peak"] == max(d["held_nbytes_by_layer"])
    assert adaptive["targets"]["switch_over_full_requant"] == 0.03
    saved = report["saved_set"]  # a switch from a saved set: load (checked) + copy, no profiling
    assert saved["sets"] == len(report["novel"]) and 0 < saved["median_switch_s"]
    assert saved["median_switch_s"] == pytest.approx(saved["median_load_s"] + saved["median_write_s"], rel=0.5)
    packed = report["packed"]  # the same BQ packed, a saved set in its slot tables
    assert 0 < packed["slot_table_nbytes"] <= packed["budget_nbytes"]
    assert packed["max_abs_logit_diff_vs_fake_quantized"] < 1e-2
    assert packed["full_slot_table_over_without"] == pytest.approx(
        packed["forward_s_full_slot_table"] / packed["forward_s_without_slots"])
