"""The DQS bench's pieces: window splits, the bit-for-bit restore check, paired rows and the compare report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from switching_setup import quantized

from dynamo.diagnostics.compare_report import budget_key, markdown, summarize
from dynamo.diagnostics.dqs import compare, significant, spaced, split_windows, state_digest


def test_spaced_covers_the_split_evenly_and_all_of_it_when_asked():
    assert spaced(10, 3).tolist() == [0, 4, 9]  # round(4.5) = 4: half to even
    assert spaced(5, 0).tolist() == spaced(5, None).tolist() == spaced(5, 9).tolist() == [0, 1, 2, 3, 4]


def test_split_windows_keeps_held_out_calib_apart_from_profile_and_fit():
    calib = torch.arange(20)[:, None].repeat(1, 4)  # window i holds the value i
    test = torch.arange(100, 110)[:, None].repeat(1, 4)
    w = split_windows(calib, test, sample=3, calib_eval=4, test_windows=5, fit_windows=30)
    profile, held, fit = (set(x[:, 0].tolist()) for x in (w.profile, w.calib, w.fit))
    assert profile == {0, 1, 2} and len(held) == 4 and min(held) >= 3 and max(held) == 19
    assert not held & fit and not held & profile and profile <= fit  # the ceiling fits on what the switch saw and more
    assert fit | held == set(range(20))
    assert len(w.test) == 5 and w.test[0, 0] == 100 and w.test[-1, 0] == 109
    assert len(split_windows(calib, test, sample=3, calib_eval=4, test_windows=5, fit_windows=2).fit) == 2


def test_state_digest_sees_one_changed_value_anywhere():
    s = quantized("olmoe")
    before = state_digest(s.model)
    assert state_digest(s.model) == before
    name, tensor = list(s.model.state_dict().items())[-1]
    with torch.no_grad():
        tensor.view(-1)[0] += 1e-3
    assert state_digest(s.model) != before, name


def fake(kl: list[float], nll: list[float]) -> dict:
    return {"kl": kl, "nll": nll, "ppl": float(np.exp(np.mean(nll))), "top1": [0.9] * len(kl)}


def test_compare_halving_the_kl_removes_half_the_damage():
    rng = np.random.default_rng(0)
    kl = list(rng.uniform(0.01, 0.02, 12))
    nll = list(rng.uniform(3.0, 4.0, 12))
    row = compare(fake(kl, nll), fake([k / 2 for k in kl], nll))
    assert row["damage_removed"]["estimate"] == pytest.approx(0.5)
    assert significant(row["damage_removed"]) and row["ppl_ratio_to_bq"]["estimate"] == pytest.approx(1.0)
    same = compare(fake(kl, nll), fake(kl, nll))["damage_removed"]
    assert same["estimate"] == 0.0 and not significant(same)


def interval(estimate: float, low: float, high: float) -> dict:
    return {"estimate": estimate, "low": low, "high": high, "confidence": 0.95, "n": 8, "method": "BCa"}


def row(test: float, calib: float, expected: float | None = 0.4) -> dict:
    split = lambda x: {"damage_removed": interval(x, x - 0.05, x + 0.05), "ppl_ratio_to_bq": interval(1, 0.99, 1.01),  # noqa: E731
                       "top1_agree": 0.9, "kl": 0.01, "ppl": 10.0}
    switch = {"total_s": 1.0, "extra_nbytes": 100} if expected is not None else {"total_s": 1.0}
    return {"switch": switch, "test": split(test), "calib": split(calib),
            "realized": {"removed": 0.3, "over_expected": 0.3 / expected if expected else None}}


def record() -> dict:
    bq = {s: {"ppl": 10.0, "kl": 0.01, "top1_agree": 0.9, "windows": 8, "ppl_fp16": 9.9} for s in ("calib", "test")}
    domains = {d: {"bq": bq, "policies": {"paper": {"fixed": row(0.01, 0.0, None)},
                                          "rows_cols": {"0.01": row(0.40, 0.10)}, "experts8": {"0.01": row(0.10, 0.30)}},
                   "gptq_ceiling": {"test": row(0.5, 0.5)["test"], "calib": row(0.5, 0.5)["calib"],
                                    "requant": {"seconds": 2.0}}} for d in ("email", "code")}
    return {"model": "m", "quant": "q", "command": "python scripts/dqs_compare.py --model m", "wall_s": 1.0,
            "threads": 1, "quick": False, "skipped": {"lowrank": "unknown candidates"}, "known": ["code"],
            "novel": ["email"], "domains": ["email", "code"], "expert_fp16_nbytes": 10000, "paper_cache_nbytes": 120,
            "protocol": {"test_windows": {}, "calib_eval_windows": 8, "profile_windows": 4, "fit_windows": {}},
            "domains_report": domains}


def test_report_chooses_on_calib_not_test_and_marks_intervals_over_zero():
    rec = record()
    rec["summary"] = summarize(rec)
    # rows_cols wins on test, experts8 on calib: the choice is made on calib windows
    assert rec["summary"]["choice_on_calib"] == {"0.01": "experts8"}
    assert rec["summary"]["means"]["paper"]["fixed"]["bytes"] == 120  # the paper's cache, not a budget
    assert rec["summary"]["means"]["rows_cols"]["0.01"]["realized_over_expected"] == pytest.approx(0.75)
    text = markdown(rec)
    assert text.count("not significant") == 2 * 2  # paper: +1% +- 5% on test and 0% +- 5% on calib, both domains
    assert "`python scripts/dqs_compare.py --model m`" in text and "`lowrank` skipped" in text
    assert budget_key(None) == "fixed" and budget_key(0.005) == "0.005"
