"""The benchmark scripts run and write the JSON they promise (tiny settings, temporary output)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_eval_throughput_benchmark(tmp_path):
    out = tmp_path / "eval.json"
    run_script("bench_eval_throughput.py", "--windows", "8", "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["windows"] == 8 and report["ratio_of_medians"] > 0
    assert report["ours_nll"] == pytest.approx(report["plain_nll"], rel=1e-4), "both loops must score the same tokens"


@pytest.mark.slow
def test_calibration_overhead_benchmark(tmp_path):
    out = tmp_path / "calib.json"
    run_script("bench_calibration.py", "--windows", "4", "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["hessians"] is True and len(report["capture_s"]) == len(report["plain_forward_s"]) == 1
    # the recorded seconds are rounded to 1 ms; the ratio was taken before rounding
    assert report["ratio_of_medians"] == pytest.approx(report["capture_s"][0] / report["plain_forward_s"][0], rel=0.02)
    # with Hessians, the statistics hold at least one fp32 [in, in] matrix per expert and projection input
    config = json.loads((REPO / "assets" / "models" / "tiny-olmoe" / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    hessian_bytes = 4 * config["num_hidden_layers"] * config["num_experts"] * (hidden ** 2 + inter ** 2)
    assert report["stats_bytes"] >= hessian_bytes


@pytest.mark.slow
def test_gptq_transfer_diagnostic(tmp_path):
    out = tmp_path / "transfer.json"
    run_script("gptq_transfer.py", "--windows", "2", "--eval-windows", "1", "--seqlen", "128", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["domains"]) == {"code", "docs", "speeches", "literature", "email", "legal", "math", "chat"}
    for domain in report["domains"].values():
        assert 0 < domain["gptq_over_rtn"] < 1.0  # GPTQ's output error is below RTN's, summed over experts


@pytest.mark.slow
def test_export_benchmark(tmp_path):
    out = tmp_path / "export.json"
    run_script("bench_export.py", "--windows", "1", "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    ratio = report["packed_over_dequantized"]
    assert 0 < ratio["checkpoint_nbytes"] < 1 and 0 < ratio["param_nbytes"] < 1 and ratio["median_seconds"] > 0
    assert report["ppl_packed_over_dequantized"] == pytest.approx(1, abs=1e-3)  # same values, fp16 scales


@pytest.mark.slow
def test_default_run_benchmark_refuses_a_baseline_without_its_source():
    proc = subprocess.run([sys.executable, "scripts/bench_default_run.py", "--no-run", "--suite-before", "1070"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--suite-before and --suite-before-source go together" in proc.stderr
