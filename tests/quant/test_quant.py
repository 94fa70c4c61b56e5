"""Quantizers, plans and bit accounting."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.calibration import capture
from dynamo.errors import UserError
from dynamo.quant import (QSpec, QuantPlan, apply_plan, bit_accounting, quantize_gptq, quantize_rtn,
                          quantize_sequential)
from dynamo.quant.export import to_gptqmodel_dynamic
from tiny_families import EXPERTS, HIDDEN, INTER, TOP_K, build

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_rtn_error_is_at_most_half_a_step(bits, sym):
    w = torch.randn(32, 256, generator=GEN)
    q = quantize_rtn(w, QSpec(bits, group_size=64, sym=sym))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.scales.shape == (32, 4)
    step = q.scales.repeat_interleave(64, dim=1)
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    # more bits, smaller error
    if bits < 8:
        wider = {2: 3, 3: 4, 4: 6, 6: 8}[bits]
        finer = quantize_rtn(w, QSpec(wider, group_size=64, sym=sym))
        assert (finer.dequantize() - w).abs().mean() < err.mean()


def test_rtn_handles_constant_and_zero_rows():
    w = torch.zeros(2, 8)
    w[1] = 3.0
    q = quantize_rtn(w, QSpec(4, group_size=-1))
    torch.testing.assert_close(q.dequantize(), w)


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(16, 256, generator=GEN)
    spec = QSpec(3, group_size=128)
    g, _ = quantize_gptq(w, torch.eye(256), spec, damp=0.0)
    r = quantize_rtn(w, spec)
    assert torch.equal(g.codes, r.codes)
    torch.testing.assert_close(g.dequantize(), r.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_layer_output_error(bits, act_order):
    x = torch.randn(2048, 128, generator=GEN) @ torch.randn(128, 128, generator=GEN)  # correlated inputs
    w = torch.randn(64, 128, generator=GEN)
    spec = QSpec(bits, group_size=64)
    g, _ = quantize_gptq(w, x.T @ x, spec, act_order=act_order)
    r = quantize_rtn(w, spec)
    assert (x @ (w - g.dequantize()).T).norm() < (x @ (w - r.dequantize()).T).norm()


def test_gptq_without_calibration_signal_falls_back_to_rtn():
    w = torch.randn(8, 32, generator=GEN)
    g, loss = quantize_gptq(w, torch.zeros(32, 32), QSpec(4, group_size=-1))
    assert torch.equal(g.codes, quantize_rtn(w, QSpec(4, group_size=-1)).codes) and loss != loss


def test_qspec_names_and_validation():
    assert QSpec(4).name == "int4-g128-asym" and QSpec(3, -1, True).name == "int3-row-sym" and QSpec(16).name == "fp16"
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        QSpec(5)


def test_plan_json_round_trip_and_hand_edits(tmp_path):
    plan = QuantPlan(method="gptq", default=QSpec(3), shared_default=8, model={"name": "m"})
    plan.set_expert_bits(0, 1, 4)
    plan.bits[(2, 3, "down")] = 8
    plan.set_expert_bits(2, "shared", 6)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["layers"]["0"]["experts"]["1"] == 4 and data["layers"]["2"]["experts"]["3"] == {"down": 8}
    assert data["layers"]["2"]["shared"] == 6 and "avg_bits" not in data
    loaded = QuantPlan.load(tmp_path / "plan.json")
    assert loaded.bits == plan.bits and loaded.default == plan.default and loaded.shared_default == 8
    assert loaded.spec_for(0, 1, "up").bits == 4 and loaded.spec_for(0, 2, "up").bits == 3
    assert loaded.spec_for(1, "shared", "gate").bits == 8 and loaded.spec_for(2, "shared", "gate").bits == 6


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(avg_bits=3.0), "unknown key"),
    (lambda d: d["layers"].update({"0": {"experts": {"1": 5}}}), "unsupported bit-width 5"),
    (lambda d: d["layers"].update({"0": {"experts": {"1": {"gate_proj": 4}}}}), "unknown projection"),
    (lambda d: d["defaults"].update(bit=4), "unknown defaults key"),
    (lambda d: d.update(schema_version=2), "schema_version"),
])
def test_bad_plans_are_refused_on_load(tmp_path, edit, match):
    data = QuantPlan(method="rtn", default=QSpec(4)).to_dict()
    edit(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=match):
        QuantPlan.load(tmp_path / "plan.json")


def test_plan_naming_a_missing_layer_or_expert_is_refused():
    model = build("olmoe")
    plan = QuantPlan(method="rtn", default=QSpec(4))
    plan.set_expert_bits(0, EXPERTS, 4)
    with pytest.raises(UserError, match=f"expert {EXPERTS} of layer 0"):
        apply_plan(model, plan)
    plan = QuantPlan(method="rtn", default=QSpec(4))
    plan.set_expert_bits(7, 0, 4)
    with pytest.raises(UserError, match="layer 7"):
        apply_plan(model, plan)


def test_bit_accounting_matches_a_hand_computed_example():
    model = build("olmoe")  # 3 MoE layers x 4 experts; gate/up [8, 16], down [16, 8]
    plan = QuantPlan(method="rtn", default=QSpec(4, group_size=8))
    plan.set_expert_bits(0, 0, 2)
    acct = bit_accounting(model, plan.spec_for)
    # int4, g8, asym: a [8,16] matrix has 8*16 codes of 4 bits and 8*2 groups of (16 + 4) bits
    gate_up_4 = 8 * 16 * 4 + 16 * 20       # 832
    down_4 = 16 * 8 * 4 + 16 * 1 * 20      # 832
    gate_up_2 = 8 * 16 * 2 + 16 * 18       # 544
    down_2 = 16 * 8 * 2 + 16 * 18          # 544
    per_expert_4, per_expert_2 = 2 * gate_up_4 + down_4, 2 * gate_up_2 + down_2
    params = 3 * 4 * 3 * 128
    expected = (11 * per_expert_4 + per_expert_2) / params
    assert acct["experts"] == pytest.approx(expected)
    assert acct["experts_codes_only"] == pytest.approx((11 * 4 + 2) / 12)
    assert acct["histogram"] == {"2": pytest.approx(1 / 12), "4": pytest.approx(11 / 12)}
    total = sum(p.numel() for p in model.parameters())
    assert acct["all"] == pytest.approx((expected * params + 16 * (total - params)) / total)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_apply_plan_fake_quantizes_experts_only_and_keeps_codes(method):
    model = build("qwen2_moe")
    before = {n: p.clone() for n, p in model.named_parameters()}
    plan = QuantPlan(method=method, default=QSpec(4, group_size=8), shared_default=8)
    stats = capture(model, torch.randint(2, 64, (2, 16), generator=GEN)) if method == "gptq" else None
    report = apply_plan(model, plan, stats, keep_codes=True)
    layers = list(moe_layers(model))
    assert report.matrices == len(layers) * (EXPERTS + 1) * 3
    for layer in layers:
        for e in range(EXPERTS):
            for p in PROJECTIONS:
                torch.testing.assert_close(layer.weight(e, p), report.codes[(layer.index, e, p)].dequantize())
    for name, p in model.named_parameters():
        if "experts" not in name and "shared_expert." not in name:
            assert torch.equal(p, before[name]), f"{name} changed"


@pytest.mark.slow  # GPTQ over the embedded model; the GPTQ equations are checked in test_references.py
def test_gptq_beats_rtn_on_every_expert_projection_of_the_embedded_model():
    from conftest import REPO
    from dynamo.config import ModelConfig
    from dynamo.models import load_model

    loaded = load_model(ModelConfig(name="tiny-olmoe", path=str(REPO / "assets" / "models" / "tiny-olmoe")))
    model = loaded.model
    ids = torch.tensor(loaded.tokenizer(open(REPO / "assets" / "data" / "code" / "calib.jsonl").read()[:60000])["input_ids"])
    windows = ids[: (len(ids) // 256) * 256].view(-1, 256)[:8]
    stats = capture(model, windows, hessians=True)
    spec = QSpec(3, group_size=128)
    worse = []
    for layer in moe_layers(model):
        routed = stats.layers[layer.index].routed
        for e in range(layer.n_experts):
            if int(routed.tokens[e]) < 64:
                continue
            for p in PROJECTIONS:
                h = routed.hessian_in[e] if p != "down" else routed.hessian_mid[e]
                w = layer.weight(e, p).float()
                g, _ = quantize_gptq(w, h, spec)
                r = quantize_rtn(w, spec)
                # ||(W - Q) X||^2 = tr((W-Q) H (W-Q)^T) with H = X^T X
                err = lambda q: float(torch.einsum("ij,jk,ik->", w - q, h, w - q))  # noqa: E731
                if err(g.dequantize()) >= err(r.dequantize()):
                    worse.append((layer.index, e, p))
    assert not worse, f"GPTQ not better than RTN on {worse}"


def test_sequential_gptq_quantizes_every_layer_with_shared_experts():
    model = build("deepseek_v2")
    plan = QuantPlan(method="gptq", default=QSpec(3, group_size=16))
    report, stats = quantize_sequential(model, plan, torch.randint(2, 64, (2, 16), generator=GEN), batch_size=1)
    assert report.matrices == 2 * (EXPERTS + 1) * 3 and sorted(stats.layers) == [1, 2]
    for layer in moe_layers(model):
        for e in range(EXPERTS):
            w = layer.weight(e, "gate")  # [INTER, HIDDEN]: one group of 16 columns per row
            assert w.shape == (INTER, HIDDEN) and HIDDEN == 16
            assert all(len(row.unique()) <= 2 ** 3 for row in w), "a row is off the 3-bit grid"
        shared = layer.shared_expert.gate_proj.weight
        assert all(len(row.unique()) <= 2 ** 3 for row in shared)
    # found by the real-shape dry runs: the sequential path kept every layer's Hessians (48 x 2.4 GB
    # for Qwen3-30B-A3B); each layer's are freed once quantized, its token counts stay for coverage
    for layer_stats in stats.layers.values():
        for group in (layer_stats.routed, layer_stats.shared):
            assert group.hessian_in is None and group.hessian_mid is None
        assert int(layer_stats.routed.tokens.sum()) == 2 * 16 * TOP_K


def test_gptqmodel_dynamic_export_and_its_refusals():
    model = build("deepseek")  # the remote-code layout: one nn.Linear per expert projection
    layers = list(moe_layers(model))
    plan = QuantPlan(method="gptq", default=QSpec(3), shared_default=16)
    plan.set_expert_bits(layers[0].index, 1, 4)
    plan.set_expert_bits(layers[1].index, 2, 8)
    config = to_gptqmodel_dynamic(plan, model)
    assert config["bits"] == 3 and config["group_size"] == 128 and config["sym"] is False

    def resolve(name):  # GPTQModel's / vLLM's rule: the first matching pattern wins
        for pattern, override in config["dynamic"].items():
            if pattern.startswith("-:") and re.match(pattern[2:], name):
                return None
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), name):
                return override["bits"]
        return config["bits"]

    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        for expert, projection, _ in layer.matrices():
            owner = layer.shared_expert if expert == "shared" else layer.experts[expert]
            want = plan.spec_for(layer.index, expert, projection)
            got = resolve(names[id(getattr(owner, f"{projection}_proj"))])
            assert got == (None if want.is_float else want.bits), (layer.index, expert, projection)
    assert resolve("model.layers.1.self_attn.q_proj") is None

    plan.set_expert_bits(layers[0].index, 0, 6)
    with pytest.raises(UserError, match="GPTQModel packs only"):
        to_gptqmodel_dynamic(plan, model)
    with pytest.raises(UserError, match="fused in 3-D"):
        to_gptqmodel_dynamic(QuantPlan(method="gptq", default=QSpec(4)), build("olmoe"))
