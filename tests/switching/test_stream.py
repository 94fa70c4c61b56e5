"""A served stream that alternates two token distributions switches once per change."""

from __future__ import annotations

import math

import pytest
import torch

from switching_setup import HIGH, LOW, logits, quantized, separated, switcher, tokens

from dynamo.errors import UserError
from dynamo.switching import RoutingShiftDetector, forward_with_routing, run_stream
from tiny_families import TOP_K

FAMILIES = ["olmoe", "qwen2_moe"]
SEGMENT_BATCHES, BATCH, SEQLEN = 12, 2, 16
WINDOW, PATIENCE = 3, 2


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_is_counted_without_changing_the_outputs(family):
    model = separated(family)
    ids = tokens(LOW, 2, SEQLEN, seed=0)
    out, counts = forward_with_routing(model, ids)
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)
    assert counts and all(int(c.sum()) == ids.numel() * TOP_K for c in counts.values())


@pytest.mark.parametrize("mode", ["requant", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_alternating_stream_switches_exactly_once_per_change(family, mode):
    s = quantized(family, method="fcm", target_bits=3.0)
    sw = switcher(s, channel_mode=mode, mix=0.5)
    n = SEGMENT_BATCHES * BATCH
    segments = [(name, tokens(span, n, SEQLEN, seed=k))
                for k, (name, span) in enumerate([("low", LOW), ("high", HIGH), ("low", LOW), ("high", HIGH)])]
    detector = RoutingShiftDetector(window=WINDOW, threshold=0.2, patience=PATIENCE, cooldown=2 * WINDOW)
    report = run_stream(s.model, segments, detector, sw, batch_size=BATCH)
    assert [len(seg.switches) for seg in report.segments] == [0, 1, 1, 1]   # never inside a stable segment
    for seg in report.segments[1:]:
        assert seg.switches[0] - seg.first_batch == seg.latency
        assert 0 <= seg.latency <= WINDOW + PATIENCE
    assert [e.segment for e in report.events] == [1, 2, 3]
    assert all(e.jsd > 0.2 and e.switch is not None and e.switch["profile_s"] > 0 for e in report.events)
    assert all(seg.batches == SEGMENT_BATCHES and seg.predicted_tokens == n * (SEQLEN - 1) for seg in report.segments)
    assert all(math.isfinite(seg.ppl) and seg.ppl == pytest.approx(math.exp(seg.nll)) for seg in report.segments)
    assert len(report.jsd) == 4 * SEGMENT_BATCHES


def test_without_a_switcher_the_stream_only_detects():
    model = separated("olmoe")
    segments = [("low", tokens(LOW, 16, SEQLEN, 0)), ("high", tokens(HIGH, 16, SEQLEN, 1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_stream(model, segments, RoutingShiftDetector(WINDOW, 0.2, PATIENCE, 2 * WINDOW), batch_size=BATCH)
    assert [len(seg.switches) for seg in report.segments] == [0, 1] and report.events[0].switch is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_segments_are_refused():
    model = separated("olmoe")
    detector = RoutingShiftDetector()
    with pytest.raises(UserError, match="at least one"):
        run_stream(model, [], detector)
    with pytest.raises(UserError, match="segment 'x'"):
        run_stream(model, [("x", torch.zeros(0, 8, dtype=torch.long))], detector)
