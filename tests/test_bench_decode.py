"""scripts/bench_decode.py at toy size on CPU: FP16, packed BQ, and the optional slot-table row."""

from __future__ import annotations

import json

import pytest
import torch

bench_decode = pytest.importorskip("scripts.bench_decode")
TOY = ["--toy", "--model", "olmoe", "--layers", "1", "--prompt", "6", "--new-tokens", "2", "--reps", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_without_cuda_only_the_toy_runs(tmp_path, capsys):
    assert bench_decode.main(["--out", str(tmp_path / "d.json")]) == 2
    assert "CUDA device is needed" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_toy_decode_fp16_and_packed(tmp_path, monkeypatch):
    attached = []
    monkeypatch.setattr(bench_decode, "slot_table_api", lambda: None)
    assert bench_decode.main([*TOY, "--out", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["toy"] and report["new_tokens"] == 2 and report["batches"] == [1, 8]
    for variant in ("fp16", "bq"):
        assert set(report["results"][variant]) == {"1", "8"}
        assert all(r["tokens_per_s"] > 0 for r in report["results"][variant].values())
    assert "slot-table API" in report["results"]["bq_slots"]["skipped"] and "bq_slots" not in report["speedup_vs_fp16"]
    assert report["param_bytes"]["bq"] < report["param_bytes"]["fp16"]

    # once the packed model has a slot table, the same run measures it too
    monkeypatch.setattr(bench_decode, "slot_table_api", lambda: attached.append)
    assert bench_decode.main([*TOY, "--batches", "1", "--out", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(attached) == 1 and report["results"]["bq_slots"]["1"]["tokens_per_s"] > 0
    assert set(report["speedup_vs_fp16"]) == {"bq", "bq_slots"}
