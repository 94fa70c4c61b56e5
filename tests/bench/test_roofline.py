"""dynamo.bench.roofline (scripts/decode_roofline.py): the predicted decode speed (a bandwidth roofline) and the table it feeds
(docs/scaling.md)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from dynamo.bench.roofline import distinct_experts, main, readme_table


def test_distinct_experts():
    assert distinct_experts(64, 8, 1) == pytest.approx(8)
    assert 8 < distinct_experts(64, 8, 8) < 64
    assert distinct_experts(8, 2, 1000) == pytest.approx(8)


@pytest.mark.slow  # ~4 s
def test_roofline_rows(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--models", "olmoe", "--bits", "3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "PREDICTED" in record["what"] and {"A100-80GB-SXM", "H100-SXM"} == set(record["gpus"])
    assert all("datasheet" in g["source"] for g in record["gpus"].values())
    rows = {r["batch"]: r for r in record["rows"]}
    for batch, r in rows.items():
        fp16, bq = r["bytes_per_step"]["fp16"], r["bytes_per_step"]["bq"]
        assert fp16["lm_head_16bit"] == bq["lm_head_16bit"] == 50304 * 2048 * 2  # OLMoE's head, 16-bit in both
        assert fp16["routed_experts"] / bq["routed_experts"] == pytest.approx(16 / (3 + 19 / 128), rel=1e-3)
        assert 1 < r["speedup_vs_fp16"]["bq_slots"] < r["speedup_vs_fp16"]["bq"] < r["expert_only_limit_16_over_bits"]
        tps = r["tokens_per_s"]["H100-SXM"]
        assert tps["bq"] / tps["fp16"] == pytest.approx(r["speedup_vs_fp16"]["bq"], rel=1e-2)
    assert rows[8]["speedup_vs_fp16"]["bq"] > rows[1]["speedup_vs_fp16"]["bq"]  # experts weigh more in a batch


def test_readme_table_is_the_committed_prediction():
    record = json.loads((REPO / "results" / "benchmarks" / "decode_roofline.json").read_text())
    readme = (REPO / "docs" / "scaling.md").read_text()
    assert readme_table(record) in readme
    assert "2.91-3.08x" in readme and "predicted" in readme.lower()
