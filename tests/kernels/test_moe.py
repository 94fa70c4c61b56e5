"""Packed expert layers, routing and the MoE composition, in torch (no Triton needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamo_kernels.dispatch import backend_for, dequant_matmul, moe_experts
from dynamo_kernels.experts import PackedExperts, Routing
from dynamo_kernels.moe import moe_experts as moe_grouped
from dynamo_kernels.packing import PackedWeight
from dynamo_kernels.reference import dequant_matmul_ref, grouped_dequant_matmul_ref, moe_experts_ref
from random_experts import dense_moe, random_experts, random_weight, skewed_routing

GEN = torch.Generator().manual_seed(0)
H, I = 24, 20


def test_build_stacks_experts_by_width():
    experts = random_experts([2, 3, 3, 16], H, I, GEN)
    gate_up = {s.bits: s for s in experts.stages["gate_up"]}
    down = {s.bits: s for s in experts.stages["down"]}
    assert sorted(gate_up) == sorted(down) == [2, 3, 16]
    assert gate_up[3].experts.tolist() == [1, 2, 1, 2] and gate_up[3].col_offsets.tolist() == [0, 0, I, I]
    assert down[3].experts.tolist() == [1, 2] and down[3].col_offsets.tolist() == [0, 0]
    assert gate_up[2].qweight.shape == (2, I, 2) and gate_up[16].dense.shape == (2, I, H)
    # per-expert weights are views into the stacks: the layer is stored once
    up = experts.weight(2, "up")
    assert isinstance(up, PackedWeight) and up.qweight.data_ptr() == gate_up[3].qweight[3].data_ptr()
    assert isinstance(experts.weight(3, "down"), torch.Tensor)


def test_build_refuses_inconsistent_experts():
    good = random_weight(I, H, 4, GEN)
    with pytest.raises(ValueError, match="same positive number"):
        PackedExperts.build([good], [good], [], F.silu)
    with pytest.raises(ValueError, match="down"):
        PackedExperts.build([good], [good], [good], F.silu)  # down must be [H, I]


def test_routing_groups_rows_by_expert():
    index = torch.tensor([[2, 0], [0, 1], [2, 1]])
    routing = Routing.build(index, 4)
    assert routing.top_k == 2
    assert routing.counts.tolist() == [2, 2, 2, 0] and routing.starts.tolist() == [0, 2, 4, 6]
    assert routing.order.tolist() == [1, 2, 3, 5, 0, 4]  # row t * k + j, stable within an expert
    assert routing.rows_of(2).tolist() == [0, 4] and routing.rows_of(3).numel() == 0
    with pytest.raises(ValueError, match="expert ids"):
        Routing.build(torch.tensor([[4]]), 4)


def test_references_match_the_plain_definition():
    experts = random_experts([2, 3, 4, 6, 8, 16], H, I, GEN)
    index, weights = skewed_routing(9, 6, 3, GEN)
    hidden = torch.randn(9, H, generator=GEN)
    expected = dense_moe(experts, hidden, index, weights)
    for got in (moe_experts_ref(experts, hidden, index, weights),
                moe_grouped(experts, hidden, index, weights, grouped_dequant_matmul_ref)):
        assert torch.allclose(got.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_grouped_reference_writes_only_routed_rows():
    experts = random_experts([4, 4, 3], H, I, GEN)
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 2 gets nothing
    routing = Routing.build(index, 3)
    stack = next(s for s in experts.stages["down"] if s.bits == 4)
    x = torch.randn(6, I, generator=GEN)
    out = grouped_dequant_matmul_ref(x, stack, routing, 1, torch.full((6, H), float("nan")))
    assert not out.isnan().any()
    for row in range(6):
        expert = int(index.view(-1)[row])
        assert torch.allclose(out[row], dequant_matmul_ref(x[row:row + 1], experts.weight(expert, "down"))[0])


def test_dispatch_uses_the_torch_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend_for(torch.device("cpu")) == "torch"
    assert backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    w = random_weight(I, H, 3, GEN)
    x = torch.randn(2, 5, H, generator=GEN)
    assert torch.equal(dequant_matmul(x, w), dequant_matmul_ref(x.view(10, H), w).view(2, 5, I))
    experts = random_experts([2, 4], H, I, GEN)
    index, weights = torch.tensor([[0, 1], [1, 0]]), torch.rand(2, 2, generator=GEN)
    hidden = torch.randn(2, H, generator=GEN)
    assert torch.equal(moe_experts(experts, hidden, index, weights), moe_experts_ref(experts, hidden, index, weights))
    with pytest.raises(ValueError, match="unknown backend"):
        dequant_matmul(x, w, backend="cuda")
