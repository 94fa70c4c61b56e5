"""Paired bootstrap (dynamo.stats) against cases whose answer is known."""

import numpy as np
import pytest

from dynamo import stats


def test_ppl_ratio_of_a_constant_shift_is_exact_and_its_interval_is_a_point():
    a = np.random.default_rng(0).normal(3.0, 0.5, 100)
    r = stats.ppl_ratio(a, a + 0.1)
    assert r.estimate == pytest.approx(np.exp(0.1))
    assert r.low == pytest.approx(np.exp(0.1)) and r.high == pytest.approx(np.exp(0.1))
    assert r.excludes(1.0)


def test_ppl_ratio_interval_matches_the_normal_theory_interval_of_the_mean_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(3.0, 0.5, 400)
    d = rng.normal(0.02, 0.1, 400)
    r = stats.ppl_ratio(a, a + d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert np.log(r.low) == pytest.approx(d.mean() - half, abs=0.003)
    assert np.log(r.high) == pytest.approx(d.mean() + half, abs=0.003)
    assert r.method == "BCa" and r.n == 400


def test_noise_is_not_significant_and_a_consistent_gain_is():
    rng = np.random.default_rng(2)
    a = rng.normal(3.0, 0.5, 200)
    assert not stats.ppl_ratio(a, a + rng.normal(0, 0.05, 200)).excludes(1.0)
    assert stats.ppl_ratio(a, a - 0.01 + rng.normal(0, 0.005, 200)).high < 1.0


def test_gap_closed_and_damage_removed_known_answers():
    rng = np.random.default_rng(3)
    ref = rng.normal(3.0, 0.3, 300)
    base, new = ref + 0.2, ref + 0.1
    g = stats.gap_closed(ref, base, new)
    expected = (np.exp(base.mean()) - np.exp(new.mean())) / (np.exp(base.mean()) - np.exp(ref.mean()))
    assert g.estimate == pytest.approx(expected)
    kl_base = rng.gamma(2.0, 0.05, 300)
    d = stats.damage_removed(kl_base, 0.7 * kl_base)
    assert d.estimate == pytest.approx(0.3) and d.low == pytest.approx(0.3) and d.high == pytest.approx(0.3)


def test_mean_difference_of_paired_accuracy():
    a = np.array([1, 0, 1, 0, 1, 1, 0, 0] * 25, dtype=float)
    b = a.copy()
    b[:20] = 1.0  # 10 questions flipped from wrong to right out of 200
    r = stats.mean_difference(a, b)
    assert r.estimate == pytest.approx(10 / 200)
    assert r.low > 0 and r.excludes(0.0)


def test_unpaired_or_non_finite_samples_are_refused():
    with pytest.raises(stats.PairingError, match="differ in length"):
        stats.ppl_ratio(np.zeros(10), np.zeros(9))
    with pytest.raises(stats.PairingError, match="NaN"):
        stats.ppl_ratio(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(stats.PairingError, match="at least 2"):
        stats.ppl_ratio(np.zeros(1), np.zeros(1))


def test_mean_gap_closed_averages_domains_and_resamples_each_domain_on_its_own():
    rng = np.random.default_rng(4)
    strata = []
    for n, shift in ((50, 0.1), (80, 0.3)):
        ref = rng.normal(3.0, 0.3, n)
        strata.append((ref, ref + shift, ref + shift / 2 + rng.normal(0, 0.02, n)))
    g = stats.mean_gap_closed(strata)
    each = [stats.gap_closed(*s).estimate for s in strata]
    assert g.estimate == pytest.approx(np.mean(each)) and g.n == 130
    assert g.low < g.estimate < g.high and g.excludes(0.0) and g.high < 1.0
    # Exact shifts in every window: no spread, the interval is the point.
    ref = rng.normal(3.0, 0.3, 40)
    exact = stats.mean_gap_closed([(ref, ref + 0.2, ref + 0.1), (ref[:30], ref[:30] + 0.2, ref[:30])])
    assert exact.low == pytest.approx(exact.estimate) and exact.high == pytest.approx(exact.estimate)


def test_runs_pair_by_dataset_and_a_missing_file_says_so(tmp_path):
    import json

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    nll = np.random.default_rng(5).normal(3.0, 0.3, 30)
    (a / "window_nll.json").write_text(json.dumps({"code": nll.tolist(), "only_a": [1.0, 2.0]}))
    (b / "window_nll_bq.json").write_text(json.dumps({"code": (nll + 0.05).tolist()}))
    result = stats.compare_runs(a, b, file_b="window_nll_bq.json")
    assert list(result) == ["code"] and result["code"].estimate == pytest.approx(np.exp(0.05))
    with pytest.raises(stats.MissingSamplesError, match="window_nll.json not found"):
        stats.compare_runs(a, b)


def test_accuracy_difference_needs_the_same_questions():
    a = {"doc_id": [0, 1, 2, 3], "acc": [1, 0, 0, 1]}
    b = {"doc_id": [0, 1, 2, 3], "acc": [1, 1, 1, 1]}
    assert stats.accuracy_difference(a, b).estimate == pytest.approx(0.5)
    with pytest.raises(stats.PairingError, match="different questions"):
        stats.accuracy_difference(a, {**b, "doc_id": [0, 1, 2, 4]})
    with pytest.raises(stats.PairingError, match="acc_norm"):
        stats.accuracy_difference(a, b, metric="acc_norm")


def test_sample_file_names_are_the_ones_the_pipeline_writes():
    from dynamo import records

    assert stats.SAMPLE_FILES["ppl"] == records.WINDOW_NLL_FILE
    assert stats.SAMPLE_FILES["ppl_fp16"] == records.WINDOW_NLL_FP16_FILE
    assert stats.SAMPLE_FILES["ppl_bq"] == records.WINDOW_NLL_BQ_FILE
