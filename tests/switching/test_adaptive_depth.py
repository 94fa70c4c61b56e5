"""The adaptive switch's memory does not grow with depth: it profiles and scores one MoE layer at a time.

Tiny OLMoE models of the same width at 2 and 4 MoE layers: the bytes the switch held at once
(`AdaptiveReport.held_nbytes_peak`, one layer's Hessians and candidates) stay those of one layer
while the model's Hessians over all layers (what a whole-model capture would hold) double. The
same accounting (dynamo/dryrun/extrapolate.py switch_held_nbytes) is what the real-shape depth
dry run (scripts/dryrun_depth.py) and the "What a full run needs" table use.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_families import CONFIGS, EXPERTS, HIDDEN, INTER, VOCAB

from dynamo.adapters import moe_layers
from dynamo.calibration import capture
from dynamo.dryrun.extrapolate import switch_held_nbytes
from dynamo.quant import QSpec, QuantPlan, apply_plan
from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster


def tiny_olmoe(layers: int):
    config = CONFIGS["olmoe"]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # uneven routing, as tests/adapters/tiny_families.build does
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 1.0)
    return model


def switched(layers: int):
    model = tiny_olmoe(layers)
    fp16 = copy.deepcopy(model)
    plan = QuantPlan(method="rtn", default=QSpec(3, group_size=8))
    apply_plan(model, plan)
    sw = AdaptiveSwitcher(model, plan, ExpertMaster(fp16), budget_frac=0.05)
    windows = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    return model, sw, sw.switch_to(windows), windows


def hessian_nbytes(model, windows) -> int:
    stats = capture(model, windows, hessians=True)
    return sum(t.numel() * t.element_size() for s in stats.layers.values()
               for t in (s.routed.hessian_in, s.routed.hessian_mid))


@pytest.fixture(scope="module")
def depths():
    return {n: switched(n) for n in (2, 4)}


def test_held_bytes_are_one_layers_whatever_the_depth(depths):
    one_layer_hessians = EXPERTS * (HIDDEN ** 2 + INTER ** 2) * 4
    for n, (model, sw, report, windows) in depths.items():
        assert len(report.held_nbytes_by_layer) == n          # one entry per MoE layer, in turn
        assert report.held_nbytes_peak == max(report.held_nbytes_by_layer)
        # each entry is one layer's Hessians plus candidates, never more than the accounting's bound
        assert all(one_layer_hessians < h <= switch_held_nbytes(model, sw.budget_nbytes)["total"]
                   for h in report.held_nbytes_by_layer)
        assert sum(report.slots.values()) > 0
    (m2, sw2, r2, w2), (m4, sw4, r4, w4) = depths[2], depths[4]
    # the model's Hessians over all layers double with depth; what the switch held at once does not grow
    assert hessian_nbytes(m4, w4) == 2 * hessian_nbytes(m2, w2) == 4 * one_layer_hessians
    a2, a4 = switch_held_nbytes(m2, sw2.budget_nbytes), switch_held_nbytes(m4, sw4.budget_nbytes)
    assert (a4["hessians"], a4["candidates"]) == (a2["hessians"], a2["candidates"])  # one layer's, both depths
    assert a4["best_bound"] == pytest.approx(2 * a2["best_bound"], abs=1)  # the running best set: the budget's share
    assert r4.held_nbytes_peak < 1.25 * r2.held_nbytes_peak  # candidates vary a little by layer, Hessians not
    assert r4.held_nbytes_peak <= a4["total"] < 2 * (a4["hessians"] + a4["candidates"])  # never two layers
