"""dynamo.bench.decode (scripts/bench_decode.py) at toy size on CPU: FP16, packed BQ, and packed BQ with full slot tables."""

from __future__ import annotations

import json

import pytest
import torch

from dynamo.bench import decode as bench_decode

TOY = ["--toy", "--model", "olmoe", "--layers", "1", "--prompt", "6", "--new-tokens", "2", "--reps", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_without_cuda_only_the_toy_runs(tmp_path, capsys):
    assert bench_decode.main(["--out", str(tmp_path / "d.json")]) == 2
    assert "CUDA device is needed" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


@pytest.mark.slow  # ~5 s of decoding; the packed forward with slots is checked fast in tests/kernels
def test_toy_decode_fp16_packed_and_packed_with_full_slot_tables(tmp_path):
    assert bench_decode.main([*TOY, "--out", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["toy"] and report["new_tokens"] == 2 and report["batches"] == [1, 8]
    for variant in ("fp16", "bq", "bq_slots"):
        assert all(report["results"][variant][b]["tokens_per_s"] > 0 for b in ("1", "8"))
    tables = report["results"]["bq_slots"]["slot_tables"]
    assert 0 < tables["slot_nbytes"] <= tables["budget_nbytes"] and tables["slots"]["lowrank"] > 0  # the default
    assert set(report["speedup_vs_fp16"]) == {"bq", "bq_slots"}
    assert report["param_bytes"]["bq"] < report["param_bytes"]["fp16"]
