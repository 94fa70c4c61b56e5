"""The FP16 channel cache: what it holds, what it costs, and its files."""

from __future__ import annotations

import json

import pytest
import torch

from switching_setup import FRAC, HIGH, LOW, WIDTHS, quantized, separated, tokens

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.analysis import UNITS, Significance
from dynamo.calibration import capture
from dynamo.errors import UserError
from dynamo.switching import ChannelCache
from dynamo.switching.cache import SLICES
from tiny_families import EXPERTS, HIDDEN, INTER, build

N_LAYERS = {"olmoe": 3, "qwen2_moe": 2}   # MoE layers of the tiny models (qwen2_moe: layer 1 is dense)


def _significance(model, unit):
    caps = {"low": capture(model, tokens(LOW, 3, 12, 0), hessians=False),
            "high": capture(model, tokens(HIGH, 3, 12, 1), hessians=False)}
    return Significance.from_captures(caps, list(moe_layers(model)), "act_l2", unit)


def test_every_significance_unit_has_a_slice_layout():
    assert set(SLICES) == set(UNITS)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_cache_bytes_by_hand(family):
    model = separated(family)
    row = ChannelCache.build(model, _significance(model, "row"), FRAC)
    neuron = ChannelCache.build(model, _significance(model, "neuron"), FRAC)
    # row: 2 of 8 gate rows and 2 of 8 up rows (16 values each), 4 of 16 down rows (8 values each)
    k_gate_up, k_down = round(FRAC * INTER), round(FRAC * HIDDEN)
    assert (k_gate_up, k_down) == (2, 4)
    row_values = EXPERTS * (2 * k_gate_up * HIDDEN + k_down * INTER)               # 384 per layer
    row_bytes = 2 * row_values + 4 * EXPERTS * (2 * k_gate_up + k_down)           # fp16 + int32 indices
    assert row.nbytes == N_LAYERS[family] * row_bytes == N_LAYERS[family] * 896
    assert row.index_nbytes == N_LAYERS[family] * 128
    # neuron: 2 of 8 neurons, each a gate row, an up row and a down column of 16 values; one index set
    neuron_values = EXPERTS * k_gate_up * 3 * HIDDEN
    assert neuron.nbytes == N_LAYERS[family] * (2 * neuron_values + 4 * EXPERTS * k_gate_up) == N_LAYERS[family] * 800
    expert_weights = N_LAYERS[family] * EXPERTS * 3 * HIDDEN * INTER
    assert row.expert_weight_count == expert_weights
    assert row.fraction_of_expert_weights == pytest.approx(N_LAYERS[family] * row_values / expert_weights)
    assert row.fraction_of_expert_bytes(2) == pytest.approx(row.nbytes / (2 * expert_weights))
    assert row.aux_nbytes == 0 and not row.rtn_error


@pytest.mark.parametrize("unit", ["row", "neuron"])
def test_cache_holds_the_fp16_values_of_the_dynamic_channels(unit):
    model = separated("qwen2_moe")
    sig = _significance(model, unit)
    cache = ChannelCache.build(model, sig, FRAC)
    dynamic = sig.dynamic_channels(FRAC)
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            if unit == "row":
                for p in PROJECTIONS:
                    rows = dynamic[layer.index][p][e]
                    assert torch.equal(cache.cached(layer.index, e, p), layer.weight(e, p)[rows].half())
            else:
                c = dynamic[layer.index]["neuron"][e]
                assert torch.equal(cache.cached(layer.index, e, "gate"), layer.weight(e, "gate")[c].half())
                assert torch.equal(cache.cached(layer.index, e, "up"), layer.weight(e, "up")[c].half())
                assert torch.equal(cache.cached(layer.index, e, "down"), layer.weight(e, "down")[:, c].T.half())


def test_cache_round_trips_through_safetensors(tmp_path):
    s = quantized("olmoe")
    s.cache.save(tmp_path / "cache")
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "cache.json").exists()
    back = ChannelCache.load(tmp_path / "cache", s.model)
    assert back.summary() == s.cache.summary() and back.widths == WIDTHS["budget"] and back.meta == s.cache.meta
    for i in s.cache.layers:
        for p in PROJECTIONS:
            assert torch.equal(back.values[i][p], s.cache.values[i][p])
        for name, t in s.cache.index[i].items():
            assert torch.equal(back.index[i][name], t) and back.index[i][name].dtype == torch.int32
        assert torch.equal(back.rtn_error[i], s.cache.rtn_error[i])


def test_load_refuses_another_model_and_a_damaged_file(tmp_path):
    s = quantized("olmoe")
    s.cache.save(tmp_path / "cache")
    with pytest.raises(UserError, match="layers"):
        ChannelCache.load(tmp_path / "cache", build("qwen2_moe"))
    meta = json.loads((tmp_path / "cache.json").read_text())
    meta["shapes"]["0"]["gate"] = [8, 15]  # the stored rows hold 16 values
    (tmp_path / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="layer 0 gate"):
        ChannelCache.load(tmp_path / "cache")
    with pytest.raises(UserError, match="cannot read"):
        ChannelCache.load(tmp_path / "missing")


def test_a_cache_for_other_shapes_is_refused():
    s = quantized("olmoe")
    s.cache.shapes[0]["down"] = (15, 8)
    with pytest.raises(UserError, match="layer 0 down"):
        s.cache.validate(s.model)
