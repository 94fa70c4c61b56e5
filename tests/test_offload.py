"""model.offload: decoder layers on the CPU, one at a time on the execution device (dynamo/offload.py).

On this CPU-only machine the execution device is the CPU too, so these tests check the loop itself:
at most one decoder layer is resident at any time, the sequential GPTQ path keeps its layer resident
for the whole step, and every result is identical to the run without offload. The device-crossing
part (CPU <-> GPU) runs only where CUDA is visible (the last test).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import build

from dynamo.adapters import moe_layers
from dynamo.offload import offload_layers, offload_of
from dynamo.quant import QSpec, QuantPlan, quantize_sequential


def _plan(model) -> QuantPlan:
    plan = QuantPlan(method="gptq", default=QSpec(3, group_size=8), shared_default=4)
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            plan.set_expert_bits(layer.index, e, 3 if e % 2 else 4)
    return plan


def _one_layer_bytes(model) -> int:
    return max(sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()])
               for b in model.model.layers)


class _ResidencyProbe:
    """Records, at every decoder-layer forward, how many layers are resident on the execution device."""

    def __init__(self, state):
        self.state, self.seen = state, []
        for block in state.blocks:
            block.register_forward_pre_hook(lambda m, a: self.seen.append(len(self.state._resident)))


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek"])
def test_offloaded_forward_matches_and_holds_one_layer(family):
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, offloaded = build(family), build(family)
    state = offload_layers(offloaded, torch.device("cpu"))
    probe = _ResidencyProbe(state)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, offloaded(input_ids=ids).logits)
    assert probe.seen and max(probe.seen) == 1
    assert not state._resident  # every layer went back
    assert state.transfers == len(state.blocks)
    assert state.peak_resident_bytes == _one_layer_bytes(offloaded)
    assert offload_of(offloaded) is state and offload_of(plain) is None


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_offloaded_sequential_gptq_is_identical(family):
    windows = torch.randint(2, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    plain, offloaded = build(family), build(family)
    state = offload_layers(offloaded, torch.device("cpu"))
    probe = _ResidencyProbe(state)
    report_a, _ = quantize_sequential(plain, _plan(plain), windows, batch_size=2, keep_codes=True)
    report_b, _ = quantize_sequential(offloaded, _plan(offloaded), windows, batch_size=2, keep_codes=True)
    assert report_a.matrices == report_b.matrices > 0 and report_a.rtn_fallback == report_b.rtn_fallback
    for a, b in zip(plain.state_dict().values(), offloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert report_a.codes.keys() == report_b.codes.keys()
    assert all(q.codes.device.type == "cpu" for q in report_b.codes.values())
    assert max(probe.seen) == 1 and not state._resident
    # each layer is brought once for its step (the capture's first pass brings layer 0 early; it stays)
    assert state.transfers == len(state.blocks)


@pytest.mark.slow
def test_run_py_with_offload_records_it_and_matches(cli, tmp_path):
    # analysis, BQ, a DQS switch, the evaluations and lm-eval, with and without offload (RTN: the sequential GPTQ
    # path is compared above, at a fraction of the time)
    common = ("experiment=smoke", "eval.datasets=[code]", "eval.max_windows=2", "eval.lm_eval.limit=2",
              "quant=dynamo_3bit", "quant.method=rtn", "logger=none")
    runs = {}
    for offload in (False, True):
        status, _, err = cli(*common, f"model.offload={str(offload).lower()}", f"results_dir={tmp_path / str(offload)}")
        assert status == 0, err[-2000:]
        runs[offload] = json.loads(next((tmp_path / str(offload)).rglob("result.json")).read_text())
    for metric in ("ppl", "ppl_bq", "ppl_fp16", "lm_eval"):  # lm-eval: HFLM on the offloaded model
        assert runs[True]["metrics"][metric] == runs[False]["metrics"][metric]
    info = runs[True]["model"]["offload"]
    assert info["layer_transfers"] > 0 and info["peak_resident_layer_bytes"] > 0
    assert "offload" not in runs[False]["model"]
    assert runs[True]["config_hash"] != runs[False]["config_hash"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-crossing path needs a GPU")
def test_offload_to_gpu_matches_and_bounds_memory():
    windows = torch.randint(2, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    plain = build("qwen2_moe").cuda()
    offloaded = build("qwen2_moe")
    state = offload_layers(offloaded, torch.device("cuda"))
    assert all(p.device.type == "cpu" for b in state.blocks for p in b.parameters())
    report_a, _ = quantize_sequential(plain, _plan(plain), windows.cuda(), batch_size=2)
    report_b, _ = quantize_sequential(offloaded, _plan(offloaded), windows, batch_size=2)
    assert report_a.matrices == report_b.matrices
    for a, b in zip(plain.state_dict().values(), offloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.to(a.device), rtol=1e-3, atol=1e-3)
    assert all(p.device.type == "cpu" for b in state.blocks for p in b.parameters())
