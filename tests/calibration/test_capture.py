"""Calibration capture against a brute-force, token-by-token reference on every family."""

from __future__ import annotations

import logging

import pytest
import torch

from dynamo.adapters import expert_compute, moe_layers
from dynamo.adapters.compute import routed_forward
from dynamo.calibration import (CHANNEL_UNITS, CalibrationStats, capture, capture_sequential,
                                coverage_summary, coverage_table)
from tiny_families import EXPECTED, EXPERTS, FAMILIES, build

WINDOWS = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(7))


def record_routing(model, windows):
    """What each MoE block's experts received: (hidden [N,H], idx [N,k], weights [N,k]) per batch."""
    seen = {}

    def recorder(layer, h, idx, w):
        seen.setdefault(layer.index, []).append((h.detach().clone(), idx.clone(), w.detach().clone()))
        return routed_forward(layer, h, idx, w)

    shared_inputs = {}
    hooks = [layer.shared_expert.register_forward_hook(
        lambda m, a, o, i=layer.index: shared_inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).clone()))
        for layer in moe_layers(model) if layer.shared_expert is not None]
    with torch.no_grad(), expert_compute(model, recorder):
        for start in range(0, len(windows), 2):
            model(input_ids=windows[start:start + 2])
    for h in hooks:
        h.remove()
    return seen, shared_inputs


def swiglu(layer_weights, act, x):
    g, u = x @ layer_weights["gate"].T, x @ layer_weights["up"].T
    h = act(g) * u
    return {"gate": g, "up": u, "neuron": h, "down": h @ layer_weights["down"].T}


def reference_expert_stats(layer, records, weighting):
    """Token by token, float64."""
    d = torch.float64
    n, hid, inter = layer.n_experts, layer.hidden_size, layer.intermediate_size
    ref = {"tokens": torch.zeros(n, dtype=torch.int64), "rsum": torch.zeros(n, dtype=d),
           "hin": torch.zeros(n, hid, hid, dtype=d), "hmid": torch.zeros(n, inter, inter, dtype=d),
           "ch": {u: {s: torch.zeros(n, hid if u in ("down", "input") else inter, dtype=d) for s in ("sq", "abs", "wsq", "wabs")}
                  for u in CHANNEL_UNITS}}
    act = layer.activation()
    for hidden, idx, w in records:
        for t in range(hidden.shape[0]):
            for j in range(idx.shape[1]):
                e, r = int(idx[t, j]), float(w[t, j])
                x = hidden[t:t + 1].double()
                weights = {p: layer.weight(e, p).double() for p in ("gate", "up", "down")}
                outs = {**swiglu(weights, act, x), "input": x}
                ref["tokens"][e] += 1
                ref["rsum"][e] += r
                scale = r if weighting == "router" else 1.0
                ref["hin"][e] += scale * x.T @ x
                ref["hmid"][e] += scale * outs["neuron"].T @ outs["neuron"]
                for u, y in outs.items():
                    y = y[0]
                    ref["ch"][u]["sq"][e] += y * y
                    ref["ch"][u]["abs"][e] += y.abs()
                    ref["ch"][u]["wsq"][e] += r * y * y
                    ref["ch"][u]["wabs"][e] += r * y.abs()
    return ref


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weighting", ["none", "router"])
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_token_by_token_reference(family, weighting):
    model = build(family)
    stats = capture(model, WINDOWS, batch_size=2, hessian_weighting=weighting)
    routing, shared_inputs = record_routing(model, WINDOWS)
    assert sorted(stats.layers) == EXPECTED[family][0]
    for layer in moe_layers(model):
        got, ref = stats.layers[layer.index].routed, reference_expert_stats(layer, routing[layer.index], weighting)
        assert torch.equal(got.tokens, ref["tokens"])
        assert int(got.tokens.sum()) == WINDOWS.numel() * layer.top_k
        close(got.router_weight_sum, ref["rsum"])
        close(got.hessian_in, ref["hin"])
        close(got.hessian_mid, ref["hmid"])
        for unit in CHANNEL_UNITS:
            for stat, value in got.channels[unit].items():
                close(value, ref["ch"][unit][stat])
        shared = stats.layers[layer.index].shared
        if layer.shared_expert is None:
            assert shared is None
            continue
        x = torch.cat(shared_inputs[layer.index]).double()
        assert int(shared.tokens[0]) == x.shape[0] == WINDOWS.numel()
        gate = layer.shared_expert_gate
        r = torch.sigmoid(gate(x.float())).double().squeeze(-1) if gate is not None else torch.ones(x.shape[0]).double()
        scale = r[:, None].sqrt() if weighting == "router" else 1.0
        close(shared.hessian_in[0], (x * scale).T @ (x * scale))
        close(shared.router_weight_sum[0], r.sum())


@pytest.mark.parametrize("family", ["olmoe", "deepseek"])
def test_hessians_are_symmetric_positive_semidefinite(family):
    stats = capture(build(family), WINDOWS, batch_size=2)
    for layer in stats.layers.values():
        for h in (layer.routed.hessian_in, layer.routed.hessian_mid):
            torch.testing.assert_close(h, h.transpose(1, 2))
            assert torch.linalg.eigvalsh(h.double()).min() > -1e-6 * max(1.0, float(h.abs().max()))


def test_capture_does_not_change_the_model_output():
    model = build("qwen2_moe")
    with torch.no_grad():
        before = model(input_ids=WINDOWS).logits
    capture(model, WINDOWS)
    with torch.no_grad():
        assert torch.equal(model(input_ids=WINDOWS).logits, before)


def starve(model, layer_index, absent=3, single=2):
    """Rewrite one router's choices: expert `absent` gets no token, expert `single` exactly one."""
    layer = next(layer for layer in moe_layers(model) if layer.index == layer_index)

    def hook(module, args, output):
        logits, scores, idx = output
        idx = idx.clone()
        idx[idx == absent] = 0
        idx[idx == single] = 1
        idx[0, 0] = single  # the first token of each batch keeps exactly one slot for `single`
        return logits, scores, idx

    return layer.router.register_forward_hook(hook)


def test_zero_and_one_token_experts_give_exact_finite_statistics(caplog):
    model = build("olmoe")
    starve(model, 0)
    windows = WINDOWS[:1]
    with caplog.at_level(logging.WARNING):
        stats = capture(model, windows, min_tokens=2, policy="warn")
    routed = stats.layers[0].routed
    assert int(routed.tokens[3]) == 0 and int(routed.tokens[2]) == 1
    for t in routed.tensors("x").values():
        assert torch.isfinite(t.double()).all()
    assert routed.hessian_in[3].abs().sum() == 0 and routed.channels["down"]["sq"][3].abs().sum() == 0
    assert torch.linalg.matrix_rank(routed.hessian_in[2].double(), rtol=1e-4) == 1  # one token: x x^T
    assert "L0.E3" in caplog.text and "L0.E2" in caplog.text
    assert stats.under_covered(2)[:2] == [(0, 2), (0, 3)]


def test_rtn_fallback_marks_under_covered_experts():
    model = build("olmoe")
    starve(model, 0)
    stats = capture(model, WINDOWS[:1], min_tokens=2, policy="rtn_fallback")
    assert (0, 2) in stats.rtn_fallback and (0, 3) in stats.rtn_fallback
    assert all(stats.layers[i].routed.tokens[e] < 2 for i, e in stats.rtn_fallback)


def test_route_all_sends_every_token_to_under_covered_experts_only_for_statistics():
    model = build("olmoe")
    starve(model, 0)
    windows = WINDOWS[:1]
    plain = capture(model, windows, min_tokens=2, policy="warn")
    with torch.no_grad():
        out_before = model(input_ids=windows).logits
    routed_all = capture(model, windows, min_tokens=2, policy="route_all")
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, out_before)
    layer = next(iter(moe_layers(model)))
    routing, _ = record_routing(model, windows)
    x = torch.cat([h for h, _, _ in routing[0]]).double()
    got = routed_all.layers[0].routed
    for e in (2, 3):
        close(got.hessian_in[e], x.T @ x)  # every token of the layer, not the routed ones
        assert int(got.tokens[e]) == int(plain.layers[0].routed.tokens[e]), "counts stay the routed counts"
        assert (0, e) in routed_all.route_all
    for e in (0, 1):
        close(got.hessian_in[e], plain.layers[0].routed.hessian_in[e])
    assert torch.equal(got.tokens, plain.layers[0].routed.tokens)
    assert layer.index == 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2", "deepseek"])
def test_sequential_mode_equals_one_pass_when_nothing_changes(family):
    model = build(family)
    calls = []
    seq = capture_sequential(model, WINDOWS, lambda i, s: calls.append((i, s is None)) or False, batch_size=2)
    one = capture(model, WINDOWS, batch_size=2)
    assert [i for i, _ in calls] == list(range(3))
    assert [i for i, dense in calls if dense] == sorted(set(range(3)) - set(EXPECTED[family][0]))
    for i in one.layers:
        close(seq.layers[i].routed.hessian_in, one.layers[i].routed.hessian_in)
        assert torch.equal(seq.layers[i].routed.tokens, one.layers[i].routed.tokens)


def test_sequential_mode_feeds_the_next_layer_the_callbacks_output():
    model = build("olmoe")
    one = capture(model, WINDOWS, batch_size=2)

    def halve_first_layer(index, stats):
        if index != 0:
            return False
        for layer in moe_layers(model):
            if layer.index == 0:
                for e in range(EXPERTS):
                    layer.set_weight(e, "down", layer.weight(e, "down") * 0.5)
        return True

    seq = capture_sequential(model, WINDOWS, halve_first_layer, batch_size=2)
    close(seq.layers[0].routed.hessian_in, one.layers[0].routed.hessian_in)  # captured before the change
    assert not torch.allclose(seq.layers[1].routed.hessian_in, one.layers[1].routed.hessian_in)
    after = capture(model, WINDOWS, batch_size=2)  # the model now has the halved layer 0
    close(seq.layers[1].routed.hessian_in, after.layers[1].routed.hessian_in)


def test_save_load_roundtrip_and_coverage(tmp_path):
    stats = capture(build("qwen2_moe"), WINDOWS, min_tokens=5)
    stats.save(tmp_path / "stats")
    loaded = CalibrationStats.load(tmp_path / "stats")
    assert sorted(loaded.layers) == sorted(stats.layers)
    for i in stats.layers:
        for key, value in stats.layers[i].routed.tensors("r").items():
            assert torch.equal(loaded.layers[i].routed.tensors("r")[key], value.cpu())
        assert torch.equal(loaded.layers[i].shared.hessian_in, stats.layers[i].shared.hessian_in)
    summary = coverage_summary(stats)
    assert summary["layers"]["0"]["tokens"] == stats.layers[0].routed.tokens.tolist()
    table = coverage_table(stats)
    assert table.splitlines()[1].split()[:2] == ["layer", "E0"]
    assert str(int(stats.layers[2].routed.tokens[3])) in table.splitlines()[3]
