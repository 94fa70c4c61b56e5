"""The adaptive switch on a packed model: slots in the slot table, codes untouched, outputs equal to the
fake-quantized model holding the same slots; saved slot sets switch by a copy, and bad sets change nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from switching_setup import HIGH, LOW, logits, quantized, tokens

from dynamo.adapters import moe_layers
from dynamo.errors import UserError
from dynamo.packed.model import attach_packed, pack_experts, packed_modules, write_dequantized
from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster
from dynamo.switching.slotset import load_slot_set, save_slot_set, saved_names
from dynamo.switching.targets import PackedTarget

FAMILIES = ["olmoe", "qwen2_moe"]


def dense_and_packed(family: str, **kwargs):
    """The same BQ model twice, fake-quantized (with exactly the packed values) and packed, each with an
    adaptive switcher restoring from the same master."""
    s = quantized(family, keep_codes=True)
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    master = ExpertMaster(fp16)
    write_dequantized(s.model, pack_experts(s.model, s.codes))
    dense = copy.deepcopy(s.model)
    attach_packed(s.model, pack_experts(s.model, s.codes))
    kwargs = {"budget_frac": 0.05, **kwargs}
    return (AdaptiveSwitcher(dense, s.plan, master, **kwargs),
            AdaptiveSwitcher(s.model, s.plan, master, **kwargs))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=0, atol=rel * float(b.abs().max()))


def packed_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts.packed." in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("slot_bits,candidates", [(8, "rows_cols"), (16, "rows_cols"), (8, "rows_cols_lowrank"),
                                                  (16, "lowrank")])
def test_packed_slots_compute_what_the_fake_quantized_model_holds(family, slot_bits, candidates):
    dense, packed = dense_and_packed(family, slot_bits=slot_bits, candidates=candidates)
    assert isinstance(packed.target, PackedTarget)
    ids = tokens(LOW, 2, 16, seed=9)
    codes = packed_tensors(packed.model)
    report = dense.switch_to(tokens(HIGH, 3, 16, seed=4))
    assert sum(report.slots.values()) > 0 and (report.slots["lowrank"] > 0) == ("lowrank" in candidates)
    packed.switch_to_set(dense.slots, "high")
    for layer in moe_layers(packed.model):  # per matrix: BQ + the same deltas
        for e in range(layer.n_experts):
            for p in ("gate", "up", "down"):
                assert close(packed.weight((layer.index, e, p)), dense.weight((layer.index, e, p)), 1e-6)
    assert close(logits(packed.model, ids), logits(dense.model, ids))
    after = packed_tensors(packed.model)
    assert all(torch.equal(after[n], t) for n, t in codes.items())  # the codes are never touched
    assert sum(m.slot_table.nbytes for m in packed_modules(packed.model).values()
               if m.slot_table is not None) == report.extra_nbytes <= report.budget_nbytes
    packed.restore_bq()
    dense.restore_bq()
    assert all(m.slot_table is None for m in packed_modules(packed.model).values())
    assert close(logits(packed.model, ids), logits(dense.model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_model_profiles_and_selects_the_same_slots_itself(family):
    dense, packed = dense_and_packed(family)
    windows = tokens(HIGH, 3, 16, seed=4)
    a, b = dense.switch_to(windows), packed.switch_to(windows)
    assert a.slots == b.slots and a.extra_nbytes == b.extra_nbytes
    ids = tokens(LOW, 2, 16, seed=9)
    assert close(logits(packed.model, ids), logits(dense.model, ids))


def test_packed_models_refuse_whole_8_bit_experts():
    dense, packed = dense_and_packed("olmoe")
    with pytest.raises(UserError, match="row, column and low-rank slots only"):
        AdaptiveSwitcher(packed.model, None, packed.master, candidates="experts8")


def test_saved_slot_sets_round_trip_and_switch_by_a_copy(tmp_path):
    dense, packed = dense_and_packed("qwen2_moe", candidates="rows_cols_lowrank")
    n_experts = {i: layer.n_experts for i, layer in packed.layers.items()}
    for name, span, seed in (("low", LOW, 1), ("high", HIGH, 2)):
        dense.switch_to(tokens(span, 3, 16, seed=seed))
        save_slot_set(tmp_path, name, dense.slots, "fp-1", {"dataset": name})
    assert saved_names(tmp_path) == ["high", "low"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["sets"]["low"]["dataset"] == "low" and index["sets"]["low"]["fingerprint"] == "fp-1"
    ids = tokens(LOW, 2, 16, seed=9)
    loaded = load_slot_set(tmp_path, "high", "fp-1", n_experts)
    packed.switch_to_set(loaded, "high")
    assert close(logits(packed.model, ids), logits(dense.model, ids))  # dense is switched to "high" last
    report = packed.switch_to_set(load_slot_set(tmp_path, "low", "fp-1", n_experts), "low")
    assert report.source == "low" and report.profile_s == 0.0


@pytest.mark.parametrize("case,message", [
    ("unknown", "no saved slot set 'nope'"),
    ("fingerprint", "made for another model or plan"),
    ("truncated", "truncated or altered"),
    ("altered", "truncated or altered"),
    ("no_index", "no saved slot sets"),
])
def test_bad_saved_sets_are_one_error_and_leave_the_model_as_it_was(tmp_path, case, message):
    dense, packed = dense_and_packed("olmoe")
    n_experts = {i: layer.n_experts for i, layer in packed.layers.items()}
    dense.switch_to(tokens(HIGH, 3, 16, seed=2))
    save_slot_set(tmp_path, "high", dense.slots, "fp-1")
    packed.switch_to_set(dense.slots, "high")
    ids = tokens(LOW, 2, 16, seed=9)
    before = logits(packed.model, ids)
    name, fp = "high", "fp-1"
    if case == "unknown":
        name = "nope"
    elif case == "fingerprint":
        fp = "fp-2"
    elif case == "truncated":
        file = tmp_path / "high.safetensors"
        file.write_bytes(file.read_bytes()[:-100])
    elif case == "altered":  # same size, one byte of the tensor data flipped, after this process hashed it once
        load_slot_set(tmp_path, "high", "fp-1", n_experts)
        file = tmp_path / "high.safetensors"
        data = bytearray(file.read_bytes())
        data[-5] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        (tmp_path / "index.json").unlink()
    with pytest.raises(UserError, match=message):
        packed.switch_to_set(load_slot_set(tmp_path, name, fp, n_experts), name)
    assert torch.equal(logits(packed.model, ids), before)


@pytest.mark.parametrize("candidates", ["rows_cols", "lowrank"])
def test_a_set_for_other_shapes_is_refused_before_any_table_changes(candidates):
    dense, packed = dense_and_packed("olmoe", candidates=candidates)
    dense.switch_to(tokens(HIGH, 3, 16, seed=2))
    good = dense.slots
    bad = copy.deepcopy(good)
    layer = next(iter(bad.tables.values()))
    group = next(iter(layer.groups.values()))
    if candidates == "lowrank":
        group.a.codes = group.a.codes[:, :-1]  # an input factor one value short of the matrix's width
        group.a.scales = group.a.scales[:, :-1] if group.a.scales.shape[1] > 1 else group.a.scales
    else:
        group.index[0] = 10_000  # beyond every matrix here
    ids = tokens(LOW, 2, 16, seed=9)
    before = logits(packed.model, ids)
    with pytest.raises(UserError, match="do not fit this model"):
        packed.switch_to_set(bad, "bad")
    assert torch.equal(logits(packed.model, ids), before)


def test_a_stream_on_the_packed_model_switches_when_the_routing_shifts():
    from dynamo.switching import RoutingShiftDetector, run_stream

    _, packed = dense_and_packed("olmoe")
    segments = [("low", tokens(LOW, 6, 16, seed=1)), ("high", tokens(HIGH, 6, 16, seed=2))]
    detector = RoutingShiftDetector(window=2, threshold=0.01, patience=1, cooldown=2)
    report = run_stream(packed.model, segments, detector, packed, batch_size=2)
    assert report.events and all(e.switch is not None and e.switch["slots"]["rows"] >= 0 for e in report.events)
    assert packed.slots is not None and any(m.slot_table is not None for m in packed_modules(packed.model).values())
    assert report.serve_s > 0 and report.switch_s > 0 and 0 < report.switch_share < 1
    assert report.to_dict()["switch_share"] == round(report.switch_share, 5)


def test_a_packed_switch_failing_half_way_leaves_every_slot_table_as_it_was(monkeypatch):
    from dynamo_kernels.slots import SlotTable

    dense, packed = dense_and_packed("olmoe")
    dense.switch_to(tokens(LOW, 3, 16, seed=1))
    packed.switch_to_set(dense.slots, "low")
    tables = {i: m.slot_table for i, m in packed_modules(packed.model).items()}
    active = packed.slots
    dense.switch_to(tokens(HIGH, 3, 16, seed=2))
    real, calls = SlotTable.to, {"n": 0}

    def failing(self, device):
        calls["n"] += 1
        if calls["n"] > 1:  # the second layer's table cannot be placed
            raise RuntimeError("device out of memory")
        return real(self, device)

    monkeypatch.setattr(SlotTable, "to", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        packed.switch_to_set(dense.slots, "high")
    assert calls["n"] > 1
    assert all(m.slot_table is tables[i] for i, m in packed_modules(packed.model).items())
    assert packed.slots is active
