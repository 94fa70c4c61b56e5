"""dynamo.bench.common: the mixed-width packing both decode benchmarks time, and the helpers they share."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, tiny_olmoe_config
from dynamo.adapters import moe_layers
from dynamo.bench.common import (MIXED_WIDTHS, device_slug, domain_windows, mixed_widths, pack_mixed, param_bytes,
                                 rel_err)
from dynamo.config import SourceConfig


def test_mixed_widths_cycle_2_3_4_over_the_experts():
    assert mixed_widths(7) == [2, 3, 4, 2, 3, 4, 2]
    assert sum(mixed_widths(6)) / 6 == 3.0  # the ~3-bit budget the benchmarks stand for


def test_pack_mixed_sets_each_experts_width_in_the_plan_and_packs_every_moe_layer():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_olmoe_config(64)).eval()
    packed, plan = pack_mixed(model)
    layers = list(moe_layers(model))
    assert len(packed) == len(layers)
    for layer in layers:
        assert [plan.spec_for(layer.index, e, "gate").bits for e in range(layer.n_experts)] == \
            [MIXED_WIDTHS[e % 3] for e in range(layer.n_experts)]


def test_param_bytes_counts_each_parameter_at_its_own_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2).half())
    assert param_bytes(model) == 12 * 4 + (6 + 2) * 2


def test_rel_err_and_device_slug():
    ref = torch.tensor([1.0, -4.0])
    # max |diff| / max |ref|, within float32 rounding of 0.2 (one ulp, ~1e-8 relative)
    assert rel_err(ref + torch.tensor([0.0, 0.2]), ref) == pytest.approx(0.05, rel=1e-6)
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_domain_windows_are_the_harness_windows_of_one_split():
    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    plain = domain_windows(tok, SourceConfig(path="code"), "test", 32, 3, None)
    led = domain_windows(tok, SourceConfig(path="code"), "test", 32, 3, tok.eos_token_id)
    assert plain.shape == led.shape == (3, 32)
    assert (led[:, 0] == tok.eos_token_id).all() and torch.equal(led[0, 1:], plain[0, :31])  # BOS + 31 text tokens
