"""The channel-level switch: what it rewrites, to what, how it counts, and that it is atomic."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import dynamo.switching.switch as switch_module
from switching_setup import GROUP, HIGH, LOW, VOCAB, logits, quantized, state, switcher, tokens

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.errors import UserError
from dynamo.quant import QSpec, quantize_rtn
from dynamo.switching import ChannelCache

FAMILIES = ["olmoe", "qwen2_moe"]


def _cached_mask(cache: ChannelCache, layer, expert: int, projection: str) -> torch.Tensor:
    weight = layer.weight(expert, projection)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    index, axis = cache.slice_of(layer.index, expert, projection)
    if axis == 0:
        mask[index] = True
    else:
        mask[:, index] = True
    return mask


def _expert_weights(model) -> dict:
    return {(layer.index, e, p): layer.weight(e, p).clone() for layer in moe_layers(model)
            for e in range(layer.n_experts) for p in PROJECTIONS}


def _assert_only_cached_channels_differ(model, cache, before_state, before_experts, changed_experts):
    """Outside the experts nothing moved; inside, only the cached channels of the changed experts."""
    after = model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], before_state[k])]
    assert all(".experts." in k for k in moved), moved
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            for p in PROJECTIONS:
                diff = layer.weight(e, p) != before_experts[(layer.index, e, p)]
                if (layer.index, e) in changed_experts:
                    assert not diff[~_cached_mask(cache, layer, e, p)].any(), (layer.index, e, p)
                else:
                    assert not diff.any(), (layer.index, e, p)


def _other_widths(sw) -> dict[int, list[int]]:
    """Every expert moves: the first half of each layer up to 8 bits, the rest down to 2."""
    return {i: [8 if e < len(w) // 2 else 2 for e in range(len(w))] for i, w in sw.active_widths().items()}


@pytest.mark.parametrize("mode", ["requant", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_switch_rewrites_only_the_cached_channels_of_changed_experts(family, mode):
    s = quantized(family, method="fcm", target_bits=3.0)
    sw = switcher(s, channel_mode=mode, mix=1.0)
    before, experts = state(s.model), _expert_weights(s.model)
    report = sw.switch_to(tokens((0, VOCAB // 4), 4, 16, seed=5))
    assert report.experts_changed > 0, "the sample must move some expert for this test to mean anything"
    changed = {(i, e) for i, e, _, _ in report.changed}
    _assert_only_cached_channels_differ(s.model, s.cache, before, experts, changed)
    moved = sum(not torch.equal(v, experts[k]) for k, v in _expert_weights(s.model).items())
    assert moved > 0
    assert report.profile_s > 0 and report.allocate_s > 0 and report.requant_s > 0
    assert report.bytes_written > 0 and report.bytes_moved == report.bytes_read + report.bytes_written


@pytest.mark.parametrize("family", FAMILIES)
def test_requant_writes_rtn_at_the_new_width_from_the_fp16_cache(family):
    s = quantized(family)
    sw = switcher(s, channel_mode="requant")
    widths = _other_widths(sw)
    report = sw.apply_widths(widths)
    for layer in moe_layers(s.model):
        for e, w in enumerate(widths[layer.index]):
            for p in PROJECTIONS:
                index, _ = s.cache.slice_of(layer.index, e, p)
                expected = quantize_rtn(s.cache.cached(layer.index, e, p).float(), QSpec(w, GROUP)).dequantize()
                assert torch.equal(layer.weight(e, p)[index], expected)
    n_changed = sum(1 for i, w in widths.items() for e, b in enumerate(w) if b != sw.bq[(i, e, "gate")])
    assert report.experts_changed == n_changed
    slices = sum(s.cache.values[i][p].shape[1] for i, e, _, _ in report.changed for p in PROJECTIONS)
    assert report.slices_rewritten == slices
    values = sum(s.cache.values[i][p][e].numel() for i, e, _, _ in report.changed for p in PROJECTIONS)
    indices = sum(s.cache.slice_of(i, e, p)[0].numel() for i, e, _, _ in report.changed for p in PROJECTIONS)
    assert report.bytes_read == 2 * values + 4 * indices       # fp16 values + int32 indices from the cache
    assert report.bytes_written == 4 * values                  # into a float32 model


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_mode_restores_fp16_channels_for_wider_experts_and_bq_values_for_the_others(family):
    s = quantized(family)
    bq_model = state(s.model)
    sw = switcher(s, channel_mode="fp16")
    assert all(torch.equal(v, bq_model[k]) for k, v in s.model.state_dict().items()), "fp16 mode starts from BQ"
    bq_experts = _expert_weights(s.model)
    widths = _other_widths(sw)
    sw.apply_widths(widths)
    for layer in moe_layers(s.model):
        for e, w in enumerate(widths[layer.index]):
            for p in PROJECTIONS:
                index, _ = s.cache.slice_of(layer.index, e, p)
                if w > sw.bq[(layer.index, e, p)]:
                    assert torch.equal(layer.weight(e, p)[index], s.cache.cached(layer.index, e, p).float())
                else:
                    assert torch.equal(layer.weight(e, p), bq_experts[(layer.index, e, p)])
    assert sw.bq_copy_nbytes == 4 * s.cache.value_count


@pytest.mark.parametrize("mode", ["requant", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_restore_bq_is_bit_identical(family, mode):
    s = quantized(family, method="fcm", target_bits=3.0)
    sw = switcher(s, channel_mode=mode, mix=1.0)
    bq = state(s.model)
    ids = tokens(LOW, 2, 16, seed=9)
    bq_logits = logits(s.model, ids)
    sw.switch_to(tokens((0, VOCAB // 4), 4, 16, seed=5))
    sw.apply_widths(_other_widths(sw))
    assert not all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())
    report = sw.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())
    assert torch.equal(logits(s.model, ids), bq_logits)
    assert sw.active == sw.bq and report.experts_changed > 0


def test_requant_construction_rewrites_cached_rows_as_rtn_from_the_cache():
    s = quantized("olmoe")
    applied = _expert_weights(s.model)
    sw = switcher(s, channel_mode="requant")
    for (i, e, p), before in applied.items():
        layer = sw.layers[i]
        mask = _cached_mask(s.cache, layer, e, p)
        assert torch.equal(layer.weight(e, p)[~mask], before[~mask])
        index, _ = s.cache.slice_of(i, e, p)
        expected = quantize_rtn(s.cache.cached(i, e, p).float(), QSpec(sw.bq[(i, e, p)], GROUP)).dequantize()
        assert torch.equal(layer.weight(e, p)[index], expected)


def test_neuron_unit_switches_in_fp16_mode_and_refuses_requant():
    s = quantized("qwen2_moe", unit="neuron")
    with pytest.raises(ValueError, match="requant needs the row unit"):
        switcher(s, channel_mode="requant")
    sw = switcher(s, channel_mode="fp16")
    bq = state(s.model)
    bq_experts = _expert_weights(s.model)
    widths = _other_widths(sw)
    sw.apply_widths(widths)
    for layer in moe_layers(s.model):
        for e, w in enumerate(widths[layer.index]):
            if w <= sw.bq[(layer.index, e, "gate")]:
                continue
            c = s.cache.index[layer.index]["neuron"][e].long()
            assert torch.equal(layer.weight(e, "gate")[c], s.cache.cached(layer.index, e, "gate").float())
            assert torch.equal(layer.weight(e, "down")[:, c], s.cache.cached(layer.index, e, "down").T.float())
            assert torch.equal(layer.weight(e, "up")[c], s.cache.cached(layer.index, e, "up").float())
            rest = torch.ones(layer.weight(e, "down").shape[1], dtype=torch.bool)
            rest[c] = False
            assert torch.equal(layer.weight(e, "down")[:, rest], bq_experts[(layer.index, e, "down")][:, rest])
    sw.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_bits_count_static_channels_at_bq_and_cached_ones_at_their_width(family):
    for mode in ("requant", "fp16"):
        s = quantized(family)
        sw = switcher(s, channel_mode=mode)
        assert sw.average_bits() == {"expert_bits": pytest.approx(3.5), "exact_bits": pytest.approx(3.5)}
        widths = _other_widths(sw)
        report = sw.apply_widths(widths)
        total = expert = exact = 0
        for layer in moe_layers(s.model):
            for e, w in enumerate(widths[layer.index]):
                for p in PROJECTIONS:
                    n = layer.weight(e, p).numel()
                    cached = s.cache.values[layer.index][p][e].numel()
                    bq = sw.bq[(layer.index, e, p)]
                    held = w if mode == "requant" else (16 if w > bq else bq)
                    total, expert, exact = total + n, expert + w * n, exact + bq * (n - cached) + held * cached
        assert report.expert_bits == pytest.approx(expert / total)
        assert report.exact_bits == pytest.approx(exact / total)
        assert report.expert_bits == pytest.approx(5.0)   # half the experts at 8 bits, half at 2
        # requant: only the cached quarter follows the new widths; fp16: the widened experts' cached channels are 16-bit
        assert 3.5 < report.exact_bits < (5.0 if mode == "requant" else 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_switch_keeps_the_layer_budget(family):
    s = quantized(family, method="budget", target_bits=3.5)
    sw = switcher(s, channel_mode="requant", mix=1.0)
    bq = sw.active_widths()
    moved = 0
    for seed, span in enumerate([LOW, HIGH, (0, VOCAB // 4), (3 * VOCAB // 4, VOCAB)]):
        report = sw.switch_to(tokens(span, 4, 16, seed=20 + seed))
        moved += report.experts_changed
        for i, widths in report.widths.items():
            assert sum(widths) == sum(bq[i]) == int(3.5 * len(widths))
        assert report.expert_bits == pytest.approx(3.5)
        assert report.exact_bits == pytest.approx(3.5)   # equal-size experts: a permutation of widths
    assert moved > 0, "some sample must move the allocation for this test to mean anything"


@pytest.mark.parametrize("method", ["budget", "fcm"])
def test_mix_zero_reproduces_the_bq_allocation(method):
    s = quantized("olmoe", method=method, target_bits=3.5 if method == "budget" else 3.0)
    sw = switcher(s, mix=0.0)
    before = state(s.model)
    report = sw.switch_to(tokens((0, VOCAB // 4), 4, 16, seed=5))
    assert report.changed == [] and report.bytes_moved == 0
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failed_switch_leaves_the_model_bit_identical(family, monkeypatch):
    s = quantized(family, method="fcm", target_bits=3.0)
    sw = switcher(s, channel_mode="requant", mix=1.0)
    ids = tokens(LOW, 2, 16, seed=9)
    before, before_logits, active = state(s.model), logits(s.model, ids), dict(sw.active)

    def unchanged():
        assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
        assert torch.equal(logits(s.model, ids), before_logits) and sw.active == active

    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sw.switch_to(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sw.switch_to(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(UserError, match="non-empty"):
        sw.switch_to(torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(UserError, match="non-empty"):
        sw.switch_to(torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match="integer token ids"):
        sw.switch_to(torch.ones(2, 4))
    unchanged()

    calls = {"n": 0}
    real = switch_module._write

    def fail_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        real(*args)

    monkeypatch.setattr(switch_module, "_write", fail_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sw.switch_to(tokens((0, VOCAB // 4), 4, 16, seed=5))
    assert calls["n"] == 3, "the failure must come after two slices were written"
    unchanged()
    monkeypatch.setattr(switch_module, "_write", real)
    assert sw.switch_to(tokens((0, VOCAB // 4), 4, 16, seed=5)).experts_changed > 0  # and it still works


def test_bad_setups_are_refused_with_one_clear_error():
    s = quantized("olmoe")
    with pytest.raises(ValueError, match="channel_mode"):
        switcher(s, channel_mode="fp8")
    with pytest.raises(ValueError, match="mix"):
        switcher(s, mix=1.5)
    with pytest.raises(UserError, match="error table"):  # budget switching without the FP16 error table
        switcher(replace(s, cache=ChannelCache.build(s.model, s.significance, 0.25)))
    with pytest.raises(UserError, match="layers"):
        switcher(replace(s, cache=quantized("qwen2_moe").cache))
    with pytest.raises(UserError, match="each of the 4 experts"):
        switcher(s).apply_widths({0: [8, 8]})
