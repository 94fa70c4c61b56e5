"""Baseline allocations (MoEPTQ frequency, random control) and the bitsandbytes expert path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.config import AllocationConfig
from dynamo.errors import UserError
from dynamo.quant import QSpec, QuantPlan
from dynamo.quant.allocation import allocate, high_count
from dynamo.quant.bnb import apply_bnb
from tiny_families import EXPERTS, build


def _plan():
    return QuantPlan(method="gptq", default=QSpec(3))


def _layers(counts: dict, shared: set) -> list:
    return [SimpleNamespace(index=i, n_experts=len(c), shared_expert=object() if i in shared else None)
            for i, c in counts.items()]


def _cfg(method: str, seed: int = 0):
    return OmegaConf.merge(OmegaConf.structured(AllocationConfig),
                           {"method": method, "target_bits": 3.0, "low_bits": 2, "high_bits": 4, "seed": seed})


def test_moeptq_gives_the_most_routed_experts_the_high_width():
    counts = {0: torch.tensor([5, 50, 7, 50, 1, 9, 0, 3]), 2: torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])}
    plan = _plan()
    allocate(plan, _layers(counts, {2}), _cfg("moeptq"), counts=counts)
    high0 = [e for e in range(8) if plan.spec_for(0, e, "down").bits == 4]
    assert high0 == [1, 2, 3, 5]  # counts 50, 50, 9, 7: ties broken by index
    assert [e for e in range(8) if plan.spec_for(2, e, "gate").bits == 4] == [4, 5, 6, 7]
    assert plan.spec_for(2, "shared", "up").bits == 4
    assert plan.created_by["allocation"] == "moeptq"


def test_random_control_matches_the_count_and_depends_on_the_seed():
    layers = _layers({0: torch.zeros(16)}, set())
    a, b, c = _plan(), _plan(), _plan()
    allocate(a, layers, _cfg("random", seed=0))
    allocate(b, layers, _cfg("random", seed=0))
    allocate(c, layers, _cfg("random", seed=1))
    pick = lambda p: {e for e in range(16) if p.spec_for(0, e, "gate").bits == 4}  # noqa: E731
    assert len(pick(a)) == 8 and pick(a) == pick(b) and pick(a) != pick(c)


def test_high_count_follows_the_budget():
    assert high_count(64, 3.26, 2, 4) == 40 and high_count(16, 2.0, 2, 4) == 0 and high_count(16, 4.0, 2, 4) == 16
    with pytest.raises(UserError, match="outside"):
        high_count(16, 5.0, 2, 4)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_bnb_quantizes_every_expert_matrix(fmt):
    import bitsandbytes.functional as F

    model = build("qwen2_moe")
    originals = {(layer.index, e, p): layer.weight(e, p).clone()
                 for layer in moe_layers(model) for e in range(EXPERTS) for p in PROJECTIONS}
    report = apply_bnb(model, fmt)
    layers = list(moe_layers(model))
    assert report["matrices"] == len(layers) * (EXPERTS + 1) * 3
    for (i, e, p), w in originals.items():
        layer = next(layer for layer in layers if layer.index == i)
        if fmt == "nf4":
            packed, state = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
            expected = F.dequantize_4bit(packed, state)
        else:
            codes, scales, _ = F.int8_vectorwise_quant(w.half().contiguous())
            expected = F.int8_vectorwise_dequant(codes, scales).float()
        assert not torch.equal(layer.weight(e, p), w), f"L{i}.E{e}.{p} untouched"
        torch.testing.assert_close(layer.weight(e, p), expected)
    assert report["bits"]["experts"] > report["bits"]["experts_codes_only"]
