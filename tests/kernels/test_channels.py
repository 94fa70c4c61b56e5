"""Channel rows on packed experts: the patched layer equals a dense layer whose cached rows were replaced."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import dynamo_kernels.channels as channels_module
from dynamo_kernels.channels import PROJECTIONS, ChannelRows
from dynamo_kernels.experts import PackedExperts
from dynamo_kernels.moe import moe_experts as moe_grouped
from dynamo_kernels.reference import grouped_dequant_matmul_ref, moe_experts_ref
from random_experts import dense_moe, dequantized, random_experts, skewed_routing

GEN = torch.Generator().manual_seed(3)
H, I, ROWS = 24, 20, 3


def with_channels(experts: PackedExperts) -> PackedExperts:
    """The same layer plus ROWS random full-precision rows per expert and projection."""
    n = {"gate": I, "up": I, "down": H}
    k = {"gate": H, "up": H, "down": I}
    index = {p: torch.stack([torch.randperm(n[p], generator=GEN)[:ROWS] for _ in range(experts.n_experts)])
             for p in PROJECTIONS}
    values = {p: torch.randn(experts.n_experts, ROWS, k[p], generator=GEN) for p in PROJECTIONS}
    weights = {p: [experts.weight(e, p) for e in range(experts.n_experts)] for p in PROJECTIONS}
    return PackedExperts.build(weights["gate"], weights["up"], weights["down"], experts.act,
                               ChannelRows(index, values))


def dense_with_rows_replaced(experts: PackedExperts, hidden, index, weights) -> torch.Tensor:
    """Token by token in float64, from dequantized weights whose cached rows hold the channel values."""
    def dense(e: int, p: str) -> torch.Tensor:
        w = dequantized(experts, e, p)
        w[experts.channels.index[p][e]] = experts.channels.values[p][e].double()
        return w

    return dense_moe(experts, hidden, index, weights, dense)


@pytest.mark.parametrize("gather_elements", [1 << 24, 1])  # one chunk of routed rows, or one row per chunk
def test_patched_layer_equals_the_dense_layer_with_replaced_rows(monkeypatch, gather_elements):
    monkeypatch.setattr(channels_module, "GATHER_ELEMENTS", gather_elements)
    experts = with_channels(random_experts([2, 3, 6, 16, 4], H, I, GEN))
    hidden = torch.randn(9, H, generator=GEN)
    index, weights = skewed_routing(9, experts.n_experts, 2, GEN)
    expected = dense_with_rows_replaced(experts, hidden, index, weights)
    scale = float(expected.abs().max())
    for out in (moe_experts_ref(experts, hidden, index, weights),
                moe_grouped(experts, hidden, index, weights, grouped_dequant_matmul_ref)):
        assert (out.double() - expected).abs().max() <= 1e-5 * scale
    # the rows matter: without them the layer differs
    assert (moe_experts_ref(replace(experts, channels=None), hidden, index, weights).double()
            - expected).abs().max() > 1e-3 * scale


def test_channel_rows_refuse_mismatched_shapes_and_count_their_bytes():
    index = {p: torch.zeros(2, 3, dtype=torch.int64) for p in PROJECTIONS}
    values = {p: torch.zeros(2, 3, 5, dtype=torch.float16) for p in PROJECTIONS}
    assert ChannelRows(index, values).nbytes == 3 * (2 * 3 * 8 + 2 * 3 * 5 * 2)
    values["up"] = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="up"):
        ChannelRows(index, values)
