"""Quantization-sensitivity probes (dynamo.testbed): outlier statistics, undoable fake quantization,
BOS windows, training checkpoints that resume bit for bit, the probe end to end, and the model card."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_olmoe_config
from dynamo.adapters import moe_layers
from dynamo.eval.windows import cut_windows
from dynamo.quant.rtn import quantize_rtn
from dynamo.quant.spec import QSpec
from dynamo.testbed import checkpoints, model_card, sensitivity
from dynamo.testbed.probes import _channel_summary, expert_input_outliers, fake_quantized_experts


def test_cut_windows_with_and_without_bos():
    ids = torch.arange(100, 110)
    plain = cut_windows(ids, 4)
    assert plain.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107]]
    with_bos = cut_windows(ids, 4, bos_id=7)
    assert with_bos.tolist() == [[7, 100, 101, 102], [7, 103, 104, 105], [7, 106, 107, 108]]
    assert cut_windows(ids, 4, max_windows=1, bos_id=7).shape == (1, 4)


def test_channel_summary_of_one_channel_ten_times_the_others():
    rms = torch.ones(128, dtype=torch.float64)
    rms[5] = 10.0
    summary = _channel_summary(rms.square() * 50, 50)
    assert summary["max_over_median_rms"] == pytest.approx(10.0)
    assert summary["kurtosis"] == pytest.approx((1e4 + 127) * 128 / (100 + 127) ** 2, rel=1e-4)  # ~25.2
    assert summary["top_channels"][0] == 5
    flat = _channel_summary(torch.full((64,), 4.0, dtype=torch.float64), 1)
    assert flat["max_over_median_rms"] == pytest.approx(1.0) and flat["kurtosis"] == pytest.approx(1.0)


def _tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_olmoe_config(64)).eval()


def test_fake_quantized_experts_quantizes_keeps_salient_columns_and_restores_exactly():
    model = _tiny_model()
    layer = next(iter(moe_layers(model)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QSpec(bits=2, group_size=128)
    keep = {(layer.index, 1, "down"): torch.tensor([0, 3])}
    with fake_quantized_experts(model, spec, keep_columns=keep):
        gate = layer.weight(0, "gate")
        expected = quantize_rtn(before["model.layers.0.mlp.experts.gate_up_proj"][0][: gate.shape[0]], spec)
        assert torch.equal(gate, expected.dequantize().to(gate.dtype))
        down = layer.weight(1, "down")
        original_down = before["model.layers.0.mlp.experts.down_proj"][1]
        assert torch.equal(down[:, [0, 3]], original_down[:, [0, 3]])
        assert not torch.equal(down[:, 1], original_down[:, 1])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_expert_input_outliers_reports_every_moe_layer_with_and_without_position_zero():
    model = _tiny_model()
    windows = torch.randint(2, 64, (3, 16))
    out = expert_input_outliers(model, windows, batch_size=2)
    assert [o["layer"] for o in out] == [layer.index for layer in moe_layers(model)]
    for o in out:
        for part in ("all", "no_pos0"):
            assert o[part]["max_over_median_rms"] >= 1.0 and 1.0 <= o[part]["kurtosis"] <= 32
            assert len(o[part]["top_channels"]) == 3


def test_training_checkpoint_resumes_bit_for_bit(tmp_path):

    def fresh():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_olmoe_config(64))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))

    def step(model, opt, seed):
        batch = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    straight, opt = fresh()
    for s in range(3):
        step(straight, opt, s)
    first, opt1 = fresh()
    for s in range(2):
        step(first, opt1, s)
    checkpoints.save_checkpoint(tmp_path, first, opt1, {"step": 1})
    resumed, opt2 = fresh()
    assert checkpoints.load_checkpoint(tmp_path, resumed, opt2)["step"] == 1
    step(resumed, opt2, 2)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_probe_sensitivity_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "sensitivity.json"
    assert sensitivity.main([str(tiny_model_dir), "--seqlen", "64", "--max-windows", "3", "--calib-windows", "3",
                             "--bits", "3", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["fp16_ppl"]) == {"code", "docs", "speeches", "literature"}
    assert len(result["outliers"]) == 2
    ratio = result["gptq"]["3"]["ppl_ratio"]["code"]
    assert ratio["ci95"][0] <= ratio["estimate"] <= ratio["ci95"][1]
    assert set(result["salient_fp16"]["rtn3_damage_recovered"]) == {"salient", "random"}
    for pairs in ("known_vs_known", "known_vs_novel"):  # one JSD per MoE layer, in bits: within [0, 1]
        per_layer = result["routing_divergence"][pairs]["per_layer"]
        assert len(per_layer) == 2 and all(0 <= v <= 1 for v in per_layer), (pairs, per_layer)
    assert set(result["targets"]) >= {"gptq3_geomean_ppl_increase", "layers_with_max_over_median_rms_ge_10",
                                      "salient_recovery", "rtn3_worse_than_gptq3_on_every_known_domain"}


def test_routing_divergence_pairs_known_with_known_and_known_with_novel_per_layer(monkeypatch):
    """Routing made up per domain: in layer 0 the known domains share two experts and the novel ones the
    other two (disjoint: 1 bit), in layer 1 all domains route alike (0 bits). A pairing that mixed the
    groups, or a layer mix-up, moves these numbers."""
    probe = sensitivity
    known = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    novel = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    routing = {**{d: known for d in probe.KNOWN}, **{d: novel for d in probe.NOVEL}}
    monkeypatch.setattr(probe, "windows_of", lambda tok, domain, *args: domain)
    monkeypatch.setattr(probe, "routing_frequencies", lambda model, domain, top_k, batch_size: routing[domain])
    out = probe.routing_divergence(_tiny_model(), None, 16, 1, None, 1)
    assert out["known_vs_known"] == {"per_layer": [0.0, 0.0], "mean": 0.0}
    assert out["known_vs_novel"] == {"per_layer": [1.0, 0.0], "mean": 0.5} and out["unit"] == "bits"


def test_model_card_judges_the_cost_targets_from_the_benchmark(tmp_path, monkeypatch):
    """The default model's run and suite rows come from scripts/bench_default_run.py's JSON, and only for
    the model that JSON measured."""
    card = model_card
    bench = tmp_path / "default_run.json"
    monkeypatch.setattr(card, "DEFAULT_RUN", bench)
    assert card.default_run_rows("testbed-qwen-moe") == []
    run = {"model": "testbed-qwen-moe", "wall_s": 330.0, "threads": 2}
    bench.write_text(json.dumps({"run": run, "suite": {"wall_s": 1150.0},
                                 "suite_before_testbed": {"wall_s": 1000.0, "source": "CI at abc"}}))
    run_row, suite_row = card.default_run_rows("testbed-qwen-moe")
    assert "5.5 min" in run_row and run_row.endswith("| no |")  # over the 5-minute target
    assert "CI at abc: 16.7 min" in suite_row and "(+15%)" in suite_row and suite_row.endswith("| yes |")
    assert card.default_run_rows("tiny-olmoe") == [], "another model's run says nothing about this one"
