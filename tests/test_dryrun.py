"""Real-shape models: the committed published configs, and layers of the paper's models at real width.

The CI tier runs one Qwen1.5-MoE-A2.7B decoder layer at its real width (60 experts of 2048 x 1408,
the 5632-wide shared expert with its sigmoid gate) in bf16, as a GPU run would, with two short
windows, and the DeepSeek-MoE dry run's remote-code path (scripts/dryrun.py --shrink: toy widths,
the real layout). The whole dry runs are minutes each: they run only with

    DYNAMO_REALSHAPE=1 OMP_NUM_THREADS=2 python -m pytest -q -m realshape tests/test_dryrun.py
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamo.adapters import moe_layers
from dynamo.config import AnalysisConfig, ExportFormat, ModelConfig, QuantConfig
from dynamo.dryrun import REAL_MODELS, build_model, load_real_config, param_bytes
from dynamo.dryrun.build import shrink_overrides
from dynamo.dryrun.deepseek_standin import save_remote_code
from dynamo.errors import UserError
from dynamo.export.packed import check as check_packed_export
from dynamo.models import load_model
from dynamo.quant import QSpec, QuantPlan, quantize_sequential

REPO = Path(__file__).resolve().parents[1]
# Total parameters the model cards state (billions); the committed configs must reproduce them.
PUBLISHED_PARAMS_B = {"olmoe": 6.9, "qwen-moe": 14.3, "deepseek-v2-lite": 15.7, "qwen3-moe": 30.5,
                      "deepseek-moe": 16.4, "mixtral": 46.7}
# (MoE layers, routed experts, shared expert) of the full models
LAYOUT = {"olmoe": (16, 64, False), "qwen-moe": (24, 60, True), "deepseek-v2-lite": (26, 64, True),
          "qwen3-moe": (48, 128, False), "deepseek-moe": (27, 64, True), "mixtral": (32, 8, False)}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_committed_config_reproduces_the_published_model(name):
    model = build_model(name, None, device="meta")  # full depth, no memory
    assert round(param_bytes(model)["params"] / 1e9, 1) == PUBLISHED_PARAMS_B[name]
    layers = list(moe_layers(model))
    n_layers, n_experts, shared = LAYOUT[name]
    assert len(layers) == n_layers and {layer.n_experts for layer in layers} == {n_experts}
    assert all((layer.shared_expert is not None) == shared for layer in layers)
    source = json.loads((REPO / "assets" / "configs" / f"{name}.json").read_text())["_source"]
    assert source["model_id"] and "revision" in source


def test_deepseek_moe_keeps_its_dense_first_layer():
    model = build_model("deepseek-moe", 3, device="meta")
    assert [layer.index for layer in moe_layers(model)] == [1, 2]
    assert model.model.layers[0].mlp.down_proj.weight.shape == (2048, 10944)
    assert next(iter(moe_layers(model))).shared_expert.down_proj.weight.shape == (2048, 2 * 1408)


def test_deepseek_moe_standin_loads_as_remote_code_only_when_trusted(tmp_path):
    # toy widths, the real layout: dense first layer, 8 ModuleList experts, 2 shared
    model = build_model("deepseek-moe", 3, overrides=shrink_overrides(load_real_config("deepseek-moe")),
                        dtype=torch.float32)
    save_remote_code(model, tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer").save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "deepseek_standin.DeepseekStandInForCausalLM"
    assert (tmp_path / "deepseek_standin.py").is_file()  # the code travels with the weights, as on the hub
    # transformers imports that copy on its own, outside this package: torch and transformers only
    tree = ast.parse((tmp_path / "deepseek_standin.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] if node.level == 0 else "<relative import>" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "torch", "transformers"}, imported

    cfg = ModelConfig(name="deepseek-moe", path=str(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(UserError, match="ships its own modelling code"):
        load_model(cfg)
    cfg.trust_remote_code = True
    loaded = load_model(cfg).model
    assert type(loaded).__module__.startswith("transformers_modules")  # the copy beside the weights ran
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    # Two module trees (the remote-code copy and transformers' own) may pick different kernels and
    # summation orders; float32 reassociation moves a logit by a few ulps per layer, far below what a
    # wrong weight or operation does (>1e-2), so compare to 1e-5 of the logits' scale, not bit for bit.
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))
    assert [(layer.index, layer.adapter.storage, layer.shared_expert is not None) for layer in moe_layers(loaded)] == \
        [(1, "module_list", True), (2, "module_list", True)]
    with pytest.raises(UserError, match="keeps its experts in a ModuleList"):  # the packed export still refuses
        check_packed_export(QuantConfig(name="q", method="gptq", export=ExportFormat.packed), cfg, AnalysisConfig(),
                            loaded)


@pytest.mark.slow
def test_deepseek_moe_dry_run_path_at_toy_widths(tmp_path):
    """scripts/dryrun.py's remote-code path end to end: trust_remote_code load, BQ + DQS, the export's refusal."""
    out = tmp_path / "dryrun.json"
    proc = subprocess.run([sys.executable, "scripts/dryrun.py", "--model", "deepseek-moe", "--shrink", "--work",
                           str(tmp_path), "--out", str(out)], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["truncated"]["shrunk"]["overrides"]["hidden_size"] == 64
    _check_remote_code_dry_run(result)


def _check_remote_code_dry_run(result: dict) -> None:
    """No packed export (refused, its one line kept), no reload, the disk from the plan's bits."""
    assert result["pipeline"]["export"]["refused"].startswith("error: quant.export=packed saves fused-expert")
    assert result["reload"] is None and "refuses ModuleList experts" in result["reload_skipped"]
    assert set(result["runs"]) == {"pipeline"}
    pipeline = result["pipeline"]
    assert set(pipeline["ppl_dqs"]) == {"code", "docs"} and set(pipeline["switches"]) == {"code", "docs"}
    assert pipeline["gptq_matrices"] > 0 and 4 < pipeline["avg_bits"]["experts"] < 5
    extra = result["extrapolation"]
    assert extra["packed_checkpoint_basis"].startswith("accounting")
    assert 0 < extra["packed_checkpoint_gib"] < extra["bf16_checkpoint_gib"]
    switch = result["switch"]  # the adaptive switch: one layer held at a time, seconds per part
    assert set(switch["switches"]) == {"code", "docs"} and switch["held_nbytes_peak"] > 0
    assert all(len(s["held_nbytes_by_layer"]) == result["truncated"]["moe_layers"] for s in switch["switches"].values())
    assert switch["held_nbytes_peak"] <= switch["accounting_nbytes"]["total"]
    assert switch["full"]["seconds"] > 0 and switch["full"]["peak_nbytes"] > switch["held_nbytes_peak"]


@pytest.mark.slow  # a real-width layer through sequential GPTQ: ~25 s of CPU
def test_qwen_moe_layer_at_real_width_runs_sequential_gptq_in_bf16():
    # vocabulary shrunk to 512 (the embedding is not what this test is about; the dry run keeps it)
    model = build_model("qwen-moe", 1, vocab_size=512, dtype=torch.bfloat16)
    layer = next(iter(moe_layers(model)))
    assert (layer.n_experts, layer.hidden_size, layer.intermediate_size) == (60, 2048, 1408)
    plan = QuantPlan(method="gptq", default=QSpec(16), shared_default=16)
    quantized = [0, 1, 2]  # GPTQ on three experts (seconds each at this width); the rest stay bf16
    for e in quantized:
        plan.set_expert_bits(0, e, 4)
    before = layer.weight(5, "gate").clone()
    windows = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    report, stats = quantize_sequential(model, plan, windows, batch_size=2)
    s = stats.layers[0]
    assert int(s.routed.tokens.sum()) == 2 * 32 * 4 and int(s.shared.tokens.sum()) == 2 * 32
    assert s.routed.hessian_in is None and s.shared.hessian_mid is None  # freed after the layer
    assert report.matrices == 3 * len(quantized)
    for e in quantized:
        w = layer.weight(e, "down")  # [2048, 1408]: 11 groups of 128 columns per row
        assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
        if (layer.index, e) not in report.rtn_fallback:
            assert all(len(g.unique()) <= 16 for row in w[:8] for g in row.split(128)), "off the 4-bit grid"
    assert torch.equal(layer.weight(5, "gate"), before)
    logits = model(input_ids=windows[:1]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.realshape
@pytest.mark.skipif(not os.environ.get("DYNAMO_REALSHAPE"), reason="minutes per model: DYNAMO_REALSHAPE=1")
@pytest.mark.parametrize("name", REAL_MODELS)
def test_dry_run_completes(name, tmp_path):
    out = tmp_path / f"dryrun_{name}.json"
    subprocess.run([sys.executable, "scripts/dryrun.py", "--model", name, "--work", str(tmp_path), "--out", str(out)],
                   cwd=REPO, check=True)
    result = json.loads(out.read_text())
    if load_real_config(name)["model_type"] == "deepseek":  # remote code, ModuleList experts: no packed export
        _check_remote_code_dry_run(result)
    else:
        assert all(result["reload"]["ppl_matches_bq"].values())
    assert result["extrapolation"]["gpu_memory"]["sequential_nbytes"] < result["extrapolation"]["gpu_memory"]["one_pass_nbytes"]


def test_stage_peaks_attribute_each_rss_sample_to_the_stage_running_then():
    from datetime import datetime

    from dynamo.dryrun.rss import loaded_at, stage_peaks

    log = ("Loading weights: 100%\n[2026-12-03 08:15:25,100][dynamo.models][INFO] - loaded /m (OlmoeForCausalLM)\n"
           "[2026-12-03 08:15:29,467][dynamo.pipeline][INFO] - ppl code 1.0\n")
    anchor = loaded_at(log)
    assert anchor == datetime(2026, 12, 3, 8, 15, 25, 100000).timestamp()
    assert loaded_at("no model was loaded") is None
    timings = {"load_model_s": 3.0, "eval_ppl_fp16_s": 2.0, "analysis_s": 1.0, "quantize_s": 4.0, "export_s": 1.0}
    samples = [(anchor - 5, 100), (anchor - 0.5, 300), (anchor + 1, 200), (anchor + 2.5, 250), (anchor + 4, 900),
               (anchor + 6.9, 400), (anchor + 7.5, 700), (anchor + 9, 50)]
    assert stage_peaks(samples, anchor, timings) == {"load": 300, "eval_ppl_fp16": 200, "analysis": 250,
                                                     "quantize": 900, "export": 700, "other": 50}


def test_switch_accounting_holds_one_moe_layer_at_every_depth():
    """The switch's held bytes (one layer's Hessians and candidates) are the same for a truncated and the full
    model; its seconds are per-layer seconds x MoE layers (the profile scaled to the switch sample)."""
    from dynamo.dryrun.extrapolate import switch_held_nbytes, switch_needs, switch_select_flops

    full, one, four = (build_model("olmoe", n, device="meta") for n in (None, 1, 4))
    held = [switch_held_nbytes(m) for m in (full, one, four)]
    assert held[0] == held[1] == held[2]
    assert held[0]["hessians"] == 64 * (2048 ** 2 + 1024 ** 2) * 4  # OLMoE: 64 experts, H 2048, I 1024
    assert switch_held_nbytes(full, 2 ** 20)["best_bound"] == 3 * 2 * 2 ** 20 * 26 // 1024  # 3 kinds x 2 x budget
    needs = switch_needs({"profile_s": 1.0, "select_s": 0.2, "write_s": 0.1}, 100, moe_layers_full=16,
                         weights=1000, budget=10, activations=5, token_scale=8.0)
    assert (needs["profile_s"], needs["select_s"], needs["write_s"], needs["seconds"]) == (128.0, 3.2, 1.6, 132.8)
    assert switch_select_flops(one) == 64 * 2 * (2 * 1024 * 2048 ** 2 + 2048 * 1024 ** 2)  # d @ H per expert
    assert switch_select_flops(full) == 16 * switch_select_flops(one)
    assert needs["peak_nbytes"] == 1115 and "seconds" not in switch_needs(None, 1, moe_layers_full=2, weights=1,
                                                                           budget=1)


def test_dry_run_switch_summary_and_depth_check():
    from dynamo.dryrun import depth
    from dynamo.dryrun.switches import switch_summary

    report = {"profile_s": 2.0, "select_s": 0.5, "write_s": 0.3, "total_s": 2.8, "held_nbytes_peak": 7,
              "held_nbytes_by_layer": [5, 7]}
    sw = switch_summary({"policy": "adaptive", "switches": {"code": report, "docs": report},
                         "master_location": "host", "master_nbytes": 9, "budget_nbytes": 3}, 2,
                        {"eval_ppl_bq": 1.0, "eval_ppl": 1.5})
    assert sw["switches"]["code"]["select_write_over_profile"] == 0.4 and sw["held_nbytes_peak"] == 7
    assert sw["per_moe_layer_s"] == {"profile_s": 1.0, "select_s": 0.25, "write_s": 0.15}
    assert (sw["peak_rss_gib"], sw["peak_rss_gib_before"]) == (1.5, 1.0)
    assert switch_summary({"policy": "paper", "switches": {"code": {}}}, 1, None) is None

    def depth_json(n: int, switch_gib: float, held: int) -> dict:
        return {"truncated": {"layers": n}, "weights_nbytes_run_dtype": n * GIB_, "routed_expert_nbytes_run_dtype": n,
                "extrapolation": {"cpu_matmul_gflops": 100.0},
                "runs": {"pipeline": {"wall_s": 1.0, "peak_rss_gib": switch_gib, "peak_rss_gib_by_stage": {
                    "eval_ppl_bq": switch_gib - 0.5, "eval_ppl": switch_gib}}},
                "switch": {**sw, "held_nbytes_peak": held, "master_nbytes": n * GIB_}}

    GIB_ = 1024 ** 3
    rows = [depth.row(1, depth_json(1, 4.0, 100)), depth.row(4, depth_json(4, 9.9, 101))]
    assert rows[1]["switch_stage_peak_rss_gib"] == 9.9 and rows[1]["held_nbytes_peak"] == 101
    ok = depth.check(rows)["1->4"]  # grew 5.9 GiB against 3 GiB of weights + 3 GiB of master copy
    assert ok["holds"] and ok["added_weights_and_master_gib"] == 6.0
    grown = depth.check([rows[0], depth.row(4, depth_json(4, 10.5, 101))])["1->4"]  # more than the added weights
    assert not grown["holds"]
    held_grew = depth.check([rows[0], depth.row(4, depth_json(4, 9.0, 400))])["1->4"]  # the held bytes grew
    assert not held_grew["holds"] and held_grew["held_nbytes_peak_ratio"] == 4.0
