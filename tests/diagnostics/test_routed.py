"""The routed experts' realized output error: 0 without quantization, fully removed when every expert is restored."""

from __future__ import annotations

import copy

import pytest
import torch
from switching_setup import HIGH, quantized, tokens

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.diagnostics import routed_error
from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster

FAMILIES = ["olmoe", "qwen2_moe"]


def bq_weights(model) -> dict:
    return {(layer.index, e, p): layer.weight(e, p).detach().clone() for layer in moe_layers(model)
            for e in range(layer.n_experts) for p in PROJECTIONS}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_error_without_quantization(family):
    s = quantized(family)
    s.model.load_state_dict(s.fp16_state)  # the FP16 model: reference, base and current weights are one
    master = ExpertMaster(s.model)
    err = routed_error(s.model, tokens(HIGH, 2, 12, 5), master.get, master.get)
    assert err.tokens > 0
    assert err.base == 0.0 and err.now == 0.0 and err.removed == 0.0  # identical weights: identical outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_restoring_every_expert_removes_all_of_it_and_bq_none(family):
    s = quantized(family)
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    master, bq = ExpertMaster(fp16), bq_weights(s.model)
    windows = tokens(HIGH, 2, 12, 5)
    at_bq = routed_error(s.model, windows, master.get, bq.__getitem__)
    assert at_bq.base > 0 and at_bq.now == at_bq.base and at_bq.removed == 0.0
    s.model.load_state_dict(s.fp16_state)  # a "switch" that restores every expert exactly
    restored = routed_error(s.model, windows, master.get, bq.__getitem__)
    assert restored.now == 0.0 and restored.base > 0 and restored.removed == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_measurement_leaves_the_model_output_unchanged(family):
    s = quantized(family)
    windows = tokens(HIGH, 2, 12, 5)
    with torch.no_grad():
        before = s.model(input_ids=windows, use_cache=False).logits
    outputs = []
    hook = s.model.register_forward_hook(lambda module, args, out: outputs.append(out.logits))
    try:
        master = ExpertMaster(s.model)
        routed_error(s.model, windows, master.get, master.get, batch_size=len(windows))
    finally:
        hook.remove()
    # the experts are recomputed gate and up apart (the model may fuse them): float32 rounding, ~1e-7 relative
    torch.testing.assert_close(outputs[0], before, rtol=1e-5, atol=1e-5)


def test_a_switch_removes_part_of_the_error_on_windows_it_profiled():
    s = quantized("olmoe")
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    bq = bq_weights(s.model)
    switcher = AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), budget_frac=0.05, candidates="experts8")
    windows = tokens(HIGH, 2, 12, 5)
    report = switcher.switch_to(windows)
    assert report.slots["experts8"] > 0
    err = routed_error(s.model, windows, switcher.master.get, bq.__getitem__)
    # experts raised from <= 6 bits to RTN-8 on the very tokens they were chosen on: their error falls
    assert 0 < err.removed < 1
