"""`with switcher.switched(...)`: both switchers hold the switched model inside the block and BQ again,
bit for bit, when it ends, by return or by an error inside it; their summaries have the same fields."""

from __future__ import annotations

import copy

import pytest
import torch

from switching_setup import HIGH, LOW, quantized, state, switcher, tokens

from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster
from dynamo.switching.base import SwitchSummary


def _paper(family):
    s = quantized(family, method="fcm", target_bits=3.0)
    return s.model, switcher(s, channel_mode="fp16", mix=1.0)


def _adaptive(family):
    s = quantized(family)
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    return s.model, AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), budget_frac=0.05)


SWITCHERS = {"paper": _paper, "adaptive": _adaptive}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Boom(Exception):
    pass


@pytest.mark.parametrize("policy", sorted(SWITCHERS))
def test_the_switched_block_holds_the_switch_and_leaves_bq_bit_for_bit(policy):
    model, sw = SWITCHERS[policy]("olmoe")
    bq = state(model)
    with sw.switched(tokens(HIGH, 4, 16, seed=5)) as report:
        assert report.experts_changed > 0
        assert not _same(state(model), bq)  # the block sees the switched model
    assert _same(state(model), bq)

    with pytest.raises(Boom):  # an error inside the block: BQ again, and the error goes on
        with sw.switched("high", tokens(HIGH, 4, 16, seed=6)):
            assert not _same(state(model), bq)
            raise Boom
    assert _same(state(model), bq)


@pytest.mark.parametrize("policy", sorted(SWITCHERS))
def test_several_switches_and_a_failed_one_leave_bq(policy):
    from dynamo.errors import UserError

    model, sw = SWITCHERS[policy]("olmoe")
    bq = state(model)
    with pytest.raises(Boom):
        with sw.restored():  # several switches, then an error
            sw.switch_to(tokens(LOW, 4, 16, seed=7))
            sw.switch_to(tokens(HIGH, 4, 16, seed=8))
            raise Boom
    assert _same(state(model), bq)

    sw.switch_to(tokens(LOW, 4, 16, seed=7))  # switched outside any block, then a switch that cannot start
    assert not _same(state(model), bq)
    with pytest.raises(UserError, match="token id"):
        with sw.switched(torch.full((2, 16), 10**6)):
            pass
    assert _same(state(model), bq)


def test_every_policy_summarises_itself_in_the_same_fields():
    summaries = {policy: make("olmoe")[1].summary() for policy, make in SWITCHERS.items()}
    for policy, summary in summaries.items():
        assert isinstance(summary, SwitchSummary) and summary.policy == policy and summary.resident_nbytes > 0
        record = dict(summary)  # what the record's `switching` block holds: the common fields and the policy's own
        assert list(record)[:4] == ["policy", "variant", "resident_nbytes", "resident_as"]
    assert summaries["adaptive"]["budget_nbytes"] == summaries["adaptive"].resident_nbytes
    paper = summaries["paper"]
    assert paper["cache"]["nbytes"] + paper["bq_copy_nbytes"] == paper.resident_nbytes


def test_the_run_summary_line_reads_no_policy_name():
    """dynamo.report: one line for any policy, a third one included, from SwitchSummary's fields."""
    from dynamo.report import summary_table

    record = {"metrics": {"ppl": {"code": 2.0}}, "protocol": {"ppl": {"code": {"windows": 1, "seqlen": 8}}},
              "model": {"name": "m", "class": "C", "dtype": "float32"}, "quant": {"name": "q"},
              "timings": {"total_s": 1.0},
              "switching": {**SwitchSummary("my_policy", "v1", 123, "table", {"x": 1}),
                            "switches": {"code": {"total_s": 0.01, "exact_bits": 3.25}}}}
    assert "DQS (my_policy, v1): table 123 bytes, 10 ms per switch at most, exact bits up to 3.250" \
        in summary_table(record, ["code"])
