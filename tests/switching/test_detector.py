"""The routing-shift detector on synthetic count streams: JSD, patience, hysteresis, cooldown."""

from __future__ import annotations

import math

import pytest
import torch

from dynamo.analysis import Significance
from dynamo.switching import RoutingShiftDetector, js_divergence, known_reference, mean_jsd

LAYERS = (0, 2)
A = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0])
B = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.2, 0.2])


def _batch(p: torch.Tensor, gen: torch.Generator, slots: int = 64) -> dict:
    """One batch's routed counts per layer: `slots` top-k selections drawn from p (noise included)."""
    return {i: torch.bincount(torch.multinomial(p, slots, replacement=True, generator=gen), minlength=len(p))
            for i in LAYERS}


def _stream(segments: list[tuple[torch.Tensor, int]], seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [_batch(p, gen) for p, n in segments for _ in range(n)]


def _fires(detector: RoutingShiftDetector, batches: list[dict]) -> list[int]:
    return [step.batch for step in map(detector.update, batches) if step.fired]


def test_jsd_values():
    p = torch.tensor([1.0, 0.0])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, torch.tensor([0.0, 5.0])) == pytest.approx(1.0)   # disjoint supports: 1 bit
    q = torch.tensor([0.5, 0.5])
    by_hand = 0.5 * (1 * math.log2(1 / 0.75)) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert js_divergence(p, q) == pytest.approx(by_hand) == pytest.approx(js_divergence(q, p))
    assert js_divergence(torch.tensor([2, 6]), torch.tensor([1, 3])) == 0.0     # counts, not probabilities
    assert mean_jsd({0: p, 1: p}, {0: p, 1: q}) == pytest.approx(by_hand / 2)
    with pytest.raises(ValueError, match="the reference"):
        mean_jsd({0: p}, {1: p})
    with pytest.raises(ValueError, match="positive total"):
        js_divergence(torch.zeros(2), p)


def test_a_stable_noisy_stream_never_fires():
    detector = RoutingShiftDetector(window=4, threshold=0.1, patience=2, cooldown=8)
    steps = [detector.update(c) for c in _stream([(A, 400)], seed=3)]
    assert not any(s.fired for s in steps)
    jsd = [s.jsd for s in steps if s.jsd is not None]
    assert len(jsd) == 400 - 4 and 0 < max(jsd) < 0.1   # noise is measured, and stays under the threshold


def test_fires_once_per_change_with_hysteresis():
    n, window, patience = 40, 4, 2
    detector = RoutingShiftDetector(window=window, threshold=0.1, patience=patience, cooldown=8)
    fires = _fires(detector, _stream([(A, n), (B, n), (A, n), (B, n)]))
    assert len(fires) == 3
    for change, fire in zip((n, 2 * n, 3 * n), fires):
        assert change <= fire <= change + window + patience   # detection latency in batches


def test_a_reference_half_old_half_new_would_fire_twice():
    """Why the reference is re-measured after a fire: the window that fired straddles the change."""
    n = 40
    batches = _stream([(A, n), (B, n)])
    detector = RoutingShiftDetector(window=8, threshold=0.1, patience=1, cooldown=0)
    fired = []
    for step in map(detector.update, batches):
        if step.fired:
            fired.append(step.batch)
            straddling = {i: sum(batches[b][i] for b in range(step.batch - 7, step.batch + 1)) for i in LAYERS}
            detector.restart(straddling)   # what a naive detector would use
    assert len(fired) > 1
    assert _fires(RoutingShiftDetector(window=8, threshold=0.1, patience=1, cooldown=0), batches) == fired[:1]


def test_patience_ignores_a_short_burst():
    burst = _stream([(A, 20), (B, 2), (A, 20)])
    assert _fires(RoutingShiftDetector(window=1, threshold=0.3, patience=3, cooldown=0), burst) == []
    assert len(_fires(RoutingShiftDetector(window=1, threshold=0.3, patience=1, cooldown=0), burst)) >= 1


def test_cooldown_holds_back_a_second_fire():
    batches = _stream([(A, 20), (B, 10), (A, 40)])
    quick = _fires(RoutingShiftDetector(window=2, threshold=0.1, patience=1, cooldown=0), batches)
    slow = _fires(RoutingShiftDetector(window=2, threshold=0.1, patience=1, cooldown=25), batches)
    assert len(quick) == 2 and len(slow) == 2
    assert slow[0] == quick[0] and slow[1] - slow[0] >= 25 > quick[1] - quick[0]


def test_decisions_are_deterministic():
    batches = _stream([(A, 30), (B, 30)], seed=7)
    run = lambda: [(s.jsd, s.fired) for s in map(RoutingShiftDetector(4, 0.1, 2, 8).update, batches)]  # noqa: E731
    assert run() == run()


def test_a_given_reference_is_compared_from_the_first_full_window():
    detector = RoutingShiftDetector(window=3, threshold=0.1, patience=1, cooldown=0,
                                    reference={i: B * 100 for i in LAYERS})
    steps = [detector.update(c) for c in _stream([(A, 5)])]
    assert [s.jsd is None for s in steps[:3]] == [True, True, False] and steps[2].fired


def test_known_reference_sums_the_known_datasets():
    tokens = {"a": {0: torch.tensor([3, 1])}, "b": {0: torch.tensor([1, 1])}}
    sig = Significance(metric="freq", unit="row", datasets=["a", "b"],
                       channels={d: {0: {"down": torch.ones(2, 3)}} for d in "ab"}, tokens=tokens,
                       router_weight={d: {0: torch.ones(2)} for d in "ab"})
    assert torch.equal(known_reference(sig)[0], torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        RoutingShiftDetector(threshold=1.5)
    with pytest.raises(ValueError, match="window"):
        RoutingShiftDetector(window=0)
    detector = RoutingShiftDetector(window=2)
    detector.update({0: torch.ones(4)})
    with pytest.raises(ValueError, match="layers"):
        detector.update({1: torch.ones(4)})
    with pytest.raises(ValueError, match="no MoE layer"):
        detector.update({})
