"""The adaptive switch: slots chosen per dataset under one byte budget, restored from the FP16 master, atomic."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

import dynamo.switching.adaptive as adaptive_module
from switching_setup import HIGH, LOW, VOCAB, quantized, state, tokens

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.config import SwitchingConfig
from dynamo.errors import UserError
from dynamo.quant import QSpec, quantize_rtn
from dynamo.registry import SWITCH_POLICIES
from dynamo.switching.adaptive import COLUMN, EXPERT, ROW, AdaptiveSwitcher, ExpertMaster

FAMILIES = ["olmoe", "qwen2_moe"]


def setup(family: str, **kwargs):
    s = quantized(family)
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    return s, fp16, AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("candidates", ["rows_cols", "experts8", "all"])
def test_switch_writes_master_values_into_chosen_slots_only_within_budget(family, candidates):
    s, fp16, sw = setup(family, budget_frac=0.05, candidates=candidates, slot_bits=16)  # FP16 values: exact
    bq = {(layer.index, e, p): layer.weight(e, p).clone() for layer in moe_layers(s.model)
          for e in range(layer.n_experts) for p in PROJECTIONS}
    report = sw.switch_to(tokens(HIGH, 2, 12, 5))
    assert sw.slots and 0 < report.extra_nbytes <= report.budget_nbytes == sw.budget_nbytes
    expected = {k: w.clone() for k, w in bq.items()}
    for slot in sw.slots:
        master = sw.master.weights[slot.key].float()
        value = quantize_rtn(master, QSpec(8, s.plan.default.group_size)).dequantize() if slot.kind == EXPERT \
            else slot.read(master)
        slot.write(expected[slot.key], value)
    for (i, e, p), w in expected.items():
        assert torch.equal(sw.weight((i, e, p)), w), (i, e, p)
    kinds = {slot.kind for slot in sw.slots}
    assert kinds <= ({ROW, COLUMN} if candidates == "rows_cols" else {EXPERT} if candidates == "experts8"
                     else {ROW, COLUMN, EXPERT})
    assert report.exact_bits > sum(s.plan.spec_for(*k).bits * w.numel() for k, w in bq.items()) / \
        sum(w.numel() for w in bq.values())


def weighted_error(sw: AdaptiveSwitcher, stats) -> float:
    """sum over expert matrices of tr(D H D^T), D = W_fp16 - W_model, H the routed inputs' X^T X
    (the random test models' logits move at float noise, ~1e-11, so the experts' own output
    error is what can be checked)."""
    total = 0.0
    for (i, e, p), master in sw.master.weights.items():
        routed = stats.layers[i].routed
        h = (routed.hessian_mid if p == "down" else routed.hessian_in)[e].double()
        d = master.double() - sw.weight((i, e, p)).double()
        total += float(torch.einsum("ri,ij,rj->", d, h, d))
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("slot_bits", [16, 8])
def test_the_switch_lowers_the_experts_output_error_on_its_data(family, slot_bits):
    from dynamo.calibration import capture

    s, _, sw = setup(family, budget_frac=0.05, slot_bits=slot_bits)
    ids = tokens(LOW, 2, 12, 7)
    stats = capture(s.model, ids, hessians=True, hessian_weighting="router")
    before = weighted_error(sw, stats)
    report = sw.switch_to(ids)
    assert report.expected_reduction > 0  # an estimate: overlapping rows and columns count twice
    assert weighted_error(sw, stats) < 0.8 * before


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_bq_is_bit_identical_after_several_switches(family):
    s, _, sw = setup(family, budget_frac=0.05)
    bq = state(s.model)
    sw.switch_to(tokens(LOW, 2, 12, 1))
    sw.switch_to(tokens(HIGH, 2, 12, 2))
    sw.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())
    assert sw.slots == [] and sw.extra_nbytes() == 0


def test_a_failed_switch_leaves_the_model_bit_identical(monkeypatch):
    s, _, sw = setup("olmoe", budget_frac=0.05)
    sw.switch_to(tokens(LOW, 2, 12, 1))
    before, slots = state(s.model), list(sw.slots)
    calls = {"n": 0}
    real = adaptive_module._write

    def failing(weight, slot, values):
        calls["n"] += 1
        if calls["n"] > len(slots) + 3:   # after undoing the old slots and writing a few new ones
            raise RuntimeError("device write failed")
        real(weight, slot, values)

    monkeypatch.setattr(adaptive_module, "_write", failing)
    with pytest.raises(RuntimeError, match="device write failed"):
        sw.switch_to(tokens(HIGH, 2, 12, 2))
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert sw.slots == slots


@pytest.mark.parametrize("bad,message", [
    (torch.empty(0, 4, dtype=torch.long), "non-empty"),
    (torch.full((1, 4), VOCAB), "outside the model's vocabulary"),
    (torch.zeros(1, 4), "integer token ids"),
])
def test_bad_input_is_refused_and_changes_nothing(bad, message):
    s, _, sw = setup("olmoe")
    before = state(s.model)
    with pytest.raises(UserError, match=message):
        sw.switch_to(bad)
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())


def test_bad_setups_are_refused():
    s, fp16, _ = setup("olmoe")
    with pytest.raises(UserError, match="candidates"):
        AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), candidates="neurons")
    with pytest.raises(UserError, match="budget_frac"):
        AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), budget_frac=0.0)


def test_policies_are_one_table_and_the_config_default_is_in_it():
    assert list(SWITCH_POLICIES.names) == ["adaptive", "paper"]
    assert OmegaConf.structured(SwitchingConfig).policy == "adaptive"
    for name in SWITCH_POLICIES.names:
        assert SWITCH_POLICIES.get(name).name == name
    with pytest.raises(UserError, match=r"quant.switching.policy: Invalid value 'oracle', expected one of \[adaptive, paper\]"):
        SWITCH_POLICIES.get("oracle")


def test_8_bit_slots_fit_more_rows_and_restore_exactly():
    s, fp16, sw16 = setup("olmoe", budget_frac=0.05, candidates="rows_cols", slot_bits=16)
    bq = state(s.model)
    sw8 = AdaptiveSwitcher(s.model, s.plan, sw16.master, budget_frac=0.05, candidates="rows_cols", slot_bits=8)
    ids = tokens(HIGH, 2, 12, 3)
    n16 = len(sw16.switch_to(ids) and sw16.slots)
    sw16.restore_bq()
    report = sw8.switch_to(ids)
    # (about twice as many at real row lengths; here rows hold 8-16 values, so group scales weigh more)
    assert report.extra_nbytes <= sw8.budget_nbytes and len(sw8.slots) > n16
    for slot in sw8.slots[-1:]:  # the last written (a row and a column may share a weight; the later wins)
        expected = quantize_rtn(slot.read(sw8.master.weights[slot.key]).float()[None],
                                QSpec(8, s.plan.default.group_size)).dequantize()[0]
        assert torch.equal(slot.read(sw8.weight(slot.key)), expected)
    sw8.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())
