"""scripts/bench_kernels.py: refuses to invent speed numbers without CUDA; its --check runs anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "scripts/bench_kernels.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(CUDA, reason="checks the machine-without-CUDA path")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    proc = run_bench("--out-dir", str(tmp_path))
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA device is needed for speed numbers" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # every kernel under the interpreter in a subprocess; test_triton.py checks them in the fast tier
def test_check_compares_every_kernel_with_its_reference(tmp_path):
    proc = run_bench("--check", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for bits in (2, 3, 4, 6, 8):
        assert f"int{bits} matmul" in proc.stdout
    assert "MoE layer" in proc.stdout and "all kernels match their references" in proc.stdout
    assert "decode: tiny packed model" in proc.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_benchmark_writes_its_json(tmp_path):
    proc = run_bench("--models", "olmoe-1b-7b", "--bits", "3", "4", "--batches", "1", "--warmup-ms", "2",
                     "--rep-ms", "5", "--new-tokens", "4", "--decode-reps", "1", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("kernels-*.json")
    report = json.loads(path.read_text())
    assert report["copy_bandwidth_gbps"] > 0 and len(report["results"]) == 2 * 2  # 2 projections x 2 widths
    assert report["settings"]["timer"] == "triton.testing.do_bench" and report["settings"]["l2_flush_bytes"] > 0
    assert all(r["fused_ms"] > 0 and r["max_rel_err"] <= 1e-2 for r in report["results"])
    [layer] = report["moe_layers"]  # one model, one batch
    assert layer["packed_ms"] > 0 and layer["max_rel_err"] <= 1e-2 and layer["fp16_baseline"] in layer["fp16_ms"]
    decode = report["decode"]
    assert decode["packed_param_bytes"] < decode["fp16_param_bytes"] / 2
    assert all(v > 0 for v in decode["packed_tokens_per_s"].values())
    assert set(report["summary"]) >= {"projection_int3_batch1_speedup", "moe_layer_mixed_batch1_speedup",
                                      "decode_speedup"}
