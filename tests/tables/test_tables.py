"""Tables come from records only, mark every comparison's significance, and pair the same windows."""

from __future__ import annotations

import json
import math

import numpy as np

from dynamo.tables import cli as tables
from dynamo.tables import paired
from dynamo.tables.overheads import render_overheads


def _windows(ppl: float, noise: np.ndarray) -> list[float]:
    """Per-window mean NLLs whose pooled PPL is exactly `ppl` (what the record says)."""
    return (math.log(ppl) + noise - noise.mean()).tolist()


def _record(root, folder, model, quant, ppl, experiment="baselines_embedded", created="2026-01-01T00:00:00+00:00",
            bits=None, ppl_bq=None, noise=None, extra_metrics=None):
    """A result.json; with `noise` (one array per dataset) also window_nll*.json that reproduce its PPLs."""
    path = root / folder
    path.mkdir(parents=True)
    record = {"model": {"name": model}, "quant": {"name": quant}, "dataset": {"known": ["code"]},
              "created_at": created, "overrides": [f"model={model}", f"quant={quant}", f"experiment={experiment}"],
              "config": {"tag": ""}, "metrics": {"ppl": ppl, **({"avg_bits": bits} if bits else {}),
                                                **({"ppl_bq": ppl_bq} if ppl_bq else {}), **(extra_metrics or {})},
              "protocol": {"ppl": {d: {"seqlen": 512} for d in ppl}}}
    (path / "result.json").write_text(json.dumps(record))
    if noise is not None:
        for name, values in (("window_nll.json", ppl), ("window_nll_bq.json", ppl_bq)):
            if values:
                (path / name).write_text(json.dumps({d: _windows(values[d], noise[d]) for d in values}))
    return path


def test_tables_use_the_newest_record_of_their_experiments_and_check_detects_drift(tmp_path):
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
    # The newer of the two; no per-window losses in these records, so no interval.
    assert "| gptq_3bit | fp16 | 3.150 | 6.600 | 21.00 (no CI) | 105.00 (no CI) |" in baselines
    assert "rtn_3bit" not in baselines and "22.00" not in baselines
    dynamo = (out / "dynamo_bq.md").read_text()
    # (21 - 20.5) / (21 - 20): the point estimate survives without windows, said to lack a CI.
    assert "| DynaMo BQ, budget 3.0 | gptq_3bit | 3.150 | 6.600 | 20.50 (no CI) | 104.00 (no CI) | 50% (no CI) |" in dynamo
    ablation = (out / "dynamo_ablation.md").read_text()
    assert "| BQ (budget 3.0) | GPTQ-3bit | 3.150 | 6.600 | 20.50 (no CI) | 104.00 (no CI) |" in ablation
    assert "| BQ + DQS (budget 3.0) | BQ (budget 3.0) | 3.150 | 6.600 | 20.40 (no CI) | 103.00 (no CI) |" in ablation
    assert tables.main(["--runs", str(runs), "--out", str(out), "--check"]) == 0
    latex = (out / "dynamo_bq.tex").read_text()
    assert "DynaMo BQ, budget 3.0 & gptq\\_3bit & 3.150 & 6.600 & 20.50 (no CI) & 104.00 (no CI) & 50\\% (no CI) \\\\" in latex
    assert "\\begin{tabular}{lrrrrrr}" in latex
    _record(runs, "e/fp16", "tiny-olmoe", "fp16", {"code": 19.0, "chat": 99.0}, created="2026-03-01T00:00:00+00:00")
    assert tables.main(["--runs", str(runs), "--out", str(out), "--check"]) == 1


def _ablation_runs(runs, kl: bool = False):
    """FP16, GPTQ-3bit 5% worse everywhere, BQ better than GPTQ on code only, DQS = BQ up to noise."""
    rng = np.random.default_rng(0)
    n = {"code": 60, "chat": 40}
    noise = {d: rng.normal(0, 0.3, k) for d, k in n.items()}
    jitter = {d: noise[d] + rng.normal(0, 0.02, k) for d, k in n.items()}  # BQ + DQS: BQ's windows plus noise
    bits = {"experts": 3.15, "all": 6.6}
    _record(runs, "fp16", "tiny-olmoe", "fp16", {"code": 20.0, "chat": 100.0}, noise=noise)
    _record(runs, "gptq", "tiny-olmoe", "gptq_3bit", {"code": 21.0, "chat": 105.0}, bits=bits, noise=noise)
    kl_metrics = {"kl": {"code": 0.02, "chat": 0.03}, "kl_bq": {"code": 0.04, "chat": 0.03}} if kl else None
    dyn = _record(runs, "dyn", "tiny-olmoe", "dynamo_3bit", {"code": 20.5, "chat": 105.0}, experiment="dynamo_embedded",
                  bits=bits, ppl_bq={"code": 20.5, "chat": 105.0}, noise=noise, extra_metrics=kl_metrics)
    (dyn / "window_nll.json").write_text(json.dumps({d: _windows(p, jitter[d]) for d, p in
                                                     {"code": 20.5, "chat": 105.0}.items()}))
    if kl:
        base = {d: rng.gamma(2.0, 0.02, k) for d, k in n.items()}
        # BQ + DQS halves BQ's KL on code exactly; on chat it is BQ's KL plus symmetric noise.
        kl_bq = {"code": base["code"] * 0.04 / base["code"].mean(), "chat": base["chat"] * 0.03 / base["chat"].mean()}
        flip = rng.normal(0, 0.005, n["chat"])
        kl_run = {"code": kl_bq["code"] / 2, "chat": kl_bq["chat"] + flip - flip.mean()}
        (dyn / "window_kl_bq.json").write_text(json.dumps({d: v.tolist() for d, v in kl_bq.items()}))
        (dyn / "window_kl.json").write_text(json.dumps({d: v.tolist() for d, v in kl_run.items()}))
    return dyn


def test_every_compared_cell_says_whether_its_interval_excludes_no_change(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    _ablation_runs(runs)
    _record(runs, "gptq4", "tiny-olmoe", "gptq_4bit", {"code": 20.2, "chat": 101.0}, bits={"experts": 4.1, "all": 7.0})
    assert tables.main(["--runs", str(runs), "--out", str(out), "dynamo_ablation", "dynamo_bq"]) == 0
    ablation = (out / "dynamo_ablation.md").read_text()
    assert "| GPTQ-3bit | FP16 | 3.150 | 6.600 | 21.00 † | 105.00 † |" in ablation   # the same windows, 5% up
    assert "| BQ (budget 3.0) | GPTQ-3bit | 3.150 | 6.600 | 20.50 † | 105.00 n.s. |" in ablation
    assert "| BQ + DQS (budget 3.0) | BQ (budget 3.0) | 3.150 | 6.600 | 20.50 n.s. | 105.00 n.s. |" in ablation
    # The interval table: GPTQ vs FP16 is an exact 5% shift in every window, so the interval is the point.
    assert "| GPTQ-3bit | FP16 | +5.000 [+5.000, +5.000] | +5.000 [+5.000, +5.000] |" in ablation
    assert "KL(FP16" not in ablation  # no KL recorded: no KL table
    dynamo = (out / "dynamo_bq.md").read_text()
    assert "| gptq_4bit | gptq_3bit | 4.100 | 7.000 | 20.20 (no CI) | 101.00 (no CI) | 80% (no CI) |" in dynamo
    # BQ: code exactly half-way from GPTQ-3bit to FP16 in PPL, the same noise in every run: no spread.
    gap = next(line for line in dynamo.splitlines() if line.startswith("| DynaMo BQ, budget 3.0 |")).split("|")[-2]
    assert gap.strip() == "50% [50%, 50%] †"
    assert "$^\\dagger$" in (out / "dynamo_bq.tex").read_text()


def test_a_window_file_that_does_not_give_the_recorded_ppl_is_an_error_and_nothing_is_written(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    dyn = _ablation_runs(runs)
    (dyn / "window_nll.json").write_text(json.dumps({"code": [3.0] * 60, "chat": [4.6] * 40}))
    assert tables.main(["--runs", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dyn/window_nll.json gives ppl.code = 20.0855")
    assert not out.exists()


def test_kl_tables_appear_with_intervals_when_the_records_have_kl(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    _ablation_runs(runs, kl=True)
    assert tables.main(["--runs", str(runs), "--out", str(out), "dynamo_ablation"]) == 0
    ablation = (out / "dynamo_ablation.md").read_text()
    assert "### tiny-olmoe: KL(FP16 || model), mean over predicted tokens" in ablation
    assert "| BQ (budget 3.0) | - | 0.04 | 0.03 |" in ablation  # compared with GPTQ-3bit, which has no KL
    assert "| BQ + DQS (budget 3.0) | BQ (budget 3.0) | 0.02 † | 0.03 n.s. |" in ablation
    assert "| BQ + DQS (budget 3.0) | BQ (budget 3.0) | 50.0% [50.0%, 50.0%] |" in ablation


def test_table2_embedded_gives_accuracy_intervals_or_says_the_record_predates_them(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    noise = {"math": np.random.default_rng(1).normal(0, 0.3, 30)}
    acc_fp16 = np.array([1, 0, 0, 1] * 50)
    acc_gptq = acc_fp16.copy()
    acc_gptq[:40] = 0  # 20 right answers lost out of 200
    for folder, quant, ppl, acc in (("f", "fp16", 100.0, acc_fp16), ("g", "gptq_3bit", 103.0, acc_gptq),
                                    ("d", "dynamo_3bit", 102.0, None)):
        path = _record(runs, folder, "tiny-olmoe", quant, {"math": ppl}, experiment="table2_embedded", noise=noise,
                       extra_metrics={"lm_eval": {"dynamo_math_mc": {"acc": 0.5, "acc_norm": 0.5}}})
        if acc is not None:
            (path / "mc_correct.json").write_text(json.dumps(
                {"dynamo_math_mc": {"doc_id": list(range(200)), "acc": acc.tolist(), "acc_norm": acc.tolist()}}))
    assert tables.main(["--runs", str(runs), "--out", str(out), "table2_embedded"]) == 0
    table = (out / "table2_embedded.md").read_text()
    gptq = next(line for line in table.splitlines() if "| gptq_3bit | fp16 |" in line)
    assert "-0.100 [" in gptq and gptq.count("†") == 3  # acc, acc_norm and math PPL all differ
    dynamo = next(line for line in table.splitlines() if "| dynamo_3bit | gptq_3bit |" in line)
    assert dynamo.count("CI n/a (record predates per-question results)") == 2


def test_committed_tables_match_the_committed_records():
    assert tables.main(["--check"]) == 0


def _runs_with_windows(tmp_path, shift: np.ndarray):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(parents=True), b.mkdir()
    nll = np.random.default_rng(0).normal(3.0, 0.3, len(shift))
    (a / "window_nll.json").write_text(json.dumps({"code": nll.tolist()}))
    (b / "window_nll.json").write_text(json.dumps({"code": (nll + shift).tolist()}))
    return a, b


def test_paired_ppl_resolves_a_consistent_difference_and_not_noise(tmp_path, capsys):
    a, b = _runs_with_windows(tmp_path / "better", np.full(200, -0.01))
    assert paired.main([str(a), str(b), "--json", str(tmp_path / "cmp.json")]) == 0
    row = json.loads((tmp_path / "cmp.json").read_text())["datasets"]["code"]
    assert row["resolved"] and row["high"] < 1.0 and row["b_better_windows"] == 200 and row["method"]
    a, b = _runs_with_windows(tmp_path / "noise", np.random.default_rng(1).normal(0, 0.05, 200))
    rows = paired.compare(a, b, "window_nll.json", "window_nll.json", 2000)
    assert rows["code"]["low"] < 1.0 < rows["code"]["high"] and not rows["code"]["resolved"]


def test_paired_ppl_refuses_unpaired_or_missing_windows_with_one_error_line(tmp_path, capsys):
    a, b = _runs_with_windows(tmp_path, np.zeros(20))
    (b / "window_nll.json").write_text(json.dumps({"code": [1.0] * 10}))
    assert paired.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "differ in length" in err[0]
    assert paired.main([str(a), str(b), "--file-b", "window_nll_bq.json"]) == 2
    assert "window_nll_bq.json not found" in capsys.readouterr().err
    assert not (tmp_path / "cmp.json").exists()


def test_overheads_table_reads_both_switching_policies():
    """The paper policy records a channel cache and requant times; the adaptive one slot bytes and write times."""

    def record(quant, switching):
        return {"overrides": ["experiment=dynamo_embedded"], "quant": {"name": quant},
                "model": {"name": "tiny-olmoe"}, "created_at": "2026-12-02T00:00:00", "_path": quant,
                "analysis": {"capture_s": 2.0, "share_of_offline": 0.25}, "switching": switching,
                "timings": {"quantize_s": 6.0, "eval_ppl_s": 10.0}, "device": {"type": "cpu", "threads": 2}}

    paper = record("dynamo_paper", {"cache": {"nbytes": 1000, "fraction_of_expert_bytes_fp16": 0.01},
                                    "switches": {"chat": {"total_s": 0.5, "requant_s": 0.1}}})
    adaptive = record("dynamo_3bit", {"expert_fp16_nbytes": 100_000,
                                      "switches": {"chat": {"total_s": 1.0, "write_s": 0.2, "extra_nbytes": 900},
                                                   "math": {"total_s": 3.0, "write_s": 0.4, "extra_nbytes": 1000}}})
    rows = [line for line in render_overheads([paper, adaptive]).splitlines() if line.startswith("| tiny")]
    assert rows[0].split(" | ")[2] == "2", "the thread count the seconds were measured at"
    assert rows[0].split(" | ")[6:] == ["3000", "400.0", "40.0%", "1000", "1.000% |"]   # adaptive: max slot bytes
    assert rows[1].split(" | ")[6:] == ["500", "100.0", "5.0%", "1000", "1.000% |"]    # paper: its cache
