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
    check_report(json.loads(out.read_text()))


def check_report(report: dict) -> None:
    """What the report promises, each checked against a fact it is not computed from (a part's sum or
    ratio would only repeat the script's arithmetic): every timed part ran (positive), work that changed
    weights moved bytes, and everything the benchmark timed, one interval after another with --repeats 1
    (each median is its one sample), fits in the wall clock the script started before any of it."""
    assert report["full_requant_s"] > 0 and 0 < report["cache"]["cache_over_expert_bytes"] < 0.02
    timed = [report["analysis"]["capture_s"], report["cache"]["build_s"], *report["full_requant_s_each"]]
    for mode in ("requant", "fp16"):
        domains = report["modes"][mode]["domains"]
        assert sorted(domains) == sorted(report["novel"])
        for d in domains.values():
            assert d["profile_s"] > 0 and d["allocate_s"] >= 0 and d["requant_s"] >= 0, d
            changed = d["experts_changed"] > 0
            assert (d["slices_rewritten"] > 0) == changed and (d["bytes_written"] > 0) == changed, d
            assert d["bytes_read"] > 0 or not changed, "a rewritten slice is read from the cache"
            assert d["switch_over_full_requant"] > 0
            timed.append(d["total_s"])
    adaptive = report["adaptive"]
    assert sorted(adaptive["domains"]) == sorted(report["novel"])
    for d in adaptive["domains"].values():
        assert d["profile_s"] > 0 and d["select_s"] >= 0 and d["write_s"] >= 0, d
        assert (d["weights_rewritten"] > 0) == (d["extra_nbytes"] > 0), d
        assert 0 < d["extra_nbytes"] <= adaptive["budget_nbytes"]
        assert d["select_write_over_profile"] > 0
        # the adaptive switch's own accounting: one MoE layer held at a time
        assert len(d["held_nbytes_by_layer"]) > 0 and d["held_nbytes_peak"] == max(d["held_nbytes_by_layer"])
        timed.append(d["total_s"])
    assert adaptive["median_switch_over_full_requant"] > 0
    assert adaptive["targets"]["switch_over_full_requant"] == 0.03
    # wall_s is rounded to 0.1 s and each part to 1 ms or finer
    assert sum(timed) <= report["wall_s"] + 0.05 + 1e-3 * len(timed), (sum(timed), report["wall_s"])
    saved = report["saved_set"]  # a switch from a saved set: load (checked) + copy, no profiling
    assert saved["sets"] == len(report["novel"]) and 0 < saved["median_switch_s"] < report["wall_s"]
    # each switch's load and copy are parts of it, sample by sample, so their medians are at most its median
    assert 0 < saved["median_load_s"] <= saved["median_switch_s"] and 0 < saved["median_write_s"] <= saved[
        "median_switch_s"]
    packed = report["packed"]  # the same BQ packed, a saved set in its slot tables
    assert 0 < packed["slot_table_nbytes"] <= packed["budget_nbytes"]
    assert packed["max_abs_logit_diff_vs_fake_quantized"] < 1e-2
    assert packed["forward_s_full_slot_table"] > 0 and packed["forward_s_without_slots"] > 0
