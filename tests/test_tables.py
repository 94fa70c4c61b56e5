"""Tables come from records only, and paired comparisons pair the same windows."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _record(root, folder, model, quant, ppl, experiment="baselines_embedded", created="2026-01-01T00:00:00+00:00",
            bits=None, ppl_bq=None):
    path = root / folder
    path.mkdir(parents=True)
    record = {"model": {"name": model}, "quant": {"name": quant}, "dataset": {"known": ["code"]},
              "created_at": created, "overrides": [f"model={model}", f"quant={quant}", f"experiment={experiment}"],
              "config": {"tag": ""}, "metrics": {"ppl": ppl, **({"avg_bits": bits} if bits else {}),
                                                **({"ppl_bq": ppl_bq} if ppl_bq else {})},
              "protocol": {"ppl": {d: {"seqlen": 512} for d in ppl}}}
    (path / "result.json").write_text(json.dumps(record))


def test_tables_use_the_newest_record_of_their_experiments_and_check_detects_drift(tmp_path):
    tables = _load("make_tables")
    runs, out = tmp_path / "runs", tmp_path / "tables"
    bits = {"experts": 3.15, "all": 6.6, "experts_codes_only": 3.0}
    _record(runs, "a/fp16", "tiny-olmoe", "fp16", {"code": 20.0, "chat": 100.0})
    _record(runs, "a/gptq", "tiny-olmoe", "gptq_3bit", {"code": 22.0, "chat": 110.0}, bits=bits)
    _record(runs, "b/gptq", "tiny-olmoe", "gptq_3bit", {"code": 21.0, "chat": 105.0}, bits=bits,
            created="2026-02-01T00:00:00+00:00")
    _record(runs, "c/dyn", "tiny-olmoe", "dynamo_3bit", {"code": 20.4, "chat": 103.0}, experiment="dynamo_embedded",
            bits=bits, ppl_bq={"code": 20.5, "chat": 104.0})
    _record(runs, "d/other", "tiny-olmoe", "rtn_3bit", {"code": 1.0, "chat": 1.0}, experiment="smoke", bits=bits)
    assert tables.main(["--runs", str(runs), "--out", str(out)]) == 0
    baselines = (out / "baselines.md").read_text()
    assert "| gptq_3bit | 3.150 | 6.600 | 21.00 | 105.00 |" in baselines  # the newer of the two
    assert "rtn_3bit" not in baselines and "22.00" not in baselines
    dynamo = (out / "dynamo_bq.md").read_text()
    assert "| DynaMo BQ, budget 3.0 | 3.150 | 6.600 | 20.50 | 104.00 | 50% |" in dynamo  # (21 - 20.5) / (21 - 20)
    ablation = (out / "dynamo_ablation.md").read_text()
    assert "| BQ (budget 3.0) | 3.150 | 6.600 | 20.50 | 104.00 |" in ablation
    assert "| BQ + DQS (budget 3.0) | 3.150 | 6.600 | 20.40 | 103.00 |" in ablation
    assert tables.main(["--runs", str(runs), "--out", str(out), "--check"]) == 0
    latex = (out / "dynamo_bq.tex").read_text()
    assert "DynaMo BQ, budget 3.0 & 3.150 & 6.600 & 20.50 & 104.00 & 50\\% \\\\" in latex
    assert "\\begin{tabular}{lrrrrr}" in latex and "gptq\\_3bit" in latex
    _record(runs, "e/fp16", "tiny-olmoe", "fp16", {"code": 19.0, "chat": 99.0}, created="2026-03-01T00:00:00+00:00")
    assert tables.main(["--runs", str(runs), "--out", str(out), "--check"]) == 1


def test_committed_tables_match_the_committed_records():
    assert _load("make_tables").main(["--check"]) == 0


def test_paired_bootstrap_resolves_a_consistent_difference_and_not_noise(tmp_path):
    paired = _load("paired_ppl")
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.3, 200)
    better = paired.paired_bootstrap(a, a - 0.01, samples=2000)
    assert better["resolved"] and better["ci95"][1] < 1.0 and better["b_better_windows"] == 200
    noise = paired.paired_bootstrap(a, a + rng.normal(0, 0.05, 200), samples=2000)
    assert noise["ci95"][0] < 1.0 < noise["ci95"][1] and not noise["resolved"]
    with pytest.raises(SystemExit, match="different windows"):
        paired.paired_bootstrap(a, a[:10], samples=10)
