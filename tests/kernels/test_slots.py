"""Slot tables on packed experts: a layer with low-rank, row and column corrections equals the dense layer whose
weights were corrected the same way (W_bq + B A, rows, then columns), on every path that runs it."""

from __future__ import annotations

import pytest
import torch

import dynamo_kernels.slots as slots_module
from dynamo_kernels.experts import PackedExperts
from dynamo_kernels.moe import moe_experts as moe_grouped
from dynamo_kernels.reference import grouped_dequant_matmul_ref, moe_experts_ref
from dynamo_kernels.slots import LowRankGroup, SlotGroup, SlotTable, dequantize_deltas, quantize_deltas, slot_nbytes
from random_experts import dense_moe, dequantized, random_experts, skewed_routing

GEN = torch.Generator().manual_seed(5)
H, I, E = 24, 20, 5
SHAPES = {"gate": (I, H), "up": (I, H), "down": (H, I)}


def random_table(bits: int) -> SlotTable:
    """A few row and column slots per projection, spread unevenly over the experts (expert 2 has none)."""
    groups = {}
    for p, (n, k) in SHAPES.items():
        for kind, (limit, length) in (("rows", (n, k)), ("cols", (k, n))):
            experts, index = [], []
            for e, count in enumerate([3, 1, 0, 4, 2]):
                experts += [e] * count
                index += torch.randperm(limit, generator=GEN)[:count].tolist()
            deltas = 0.1 * torch.randn(len(index), length, generator=GEN)
            groups[(p, kind)] = SlotGroup.build(E, torch.tensor(experts), torch.tensor(index), deltas, bits, 8)
        ranks = [2, 0, 1, 3, 0]  # components per expert, unsorted on purpose
        experts = torch.tensor([e for e, r in enumerate(ranks) for _ in range(r)]).flip(0)
        index = torch.tensor([c for r in ranks for c in range(r)]).flip(0)
        groups[(p, "lowrank")] = LowRankGroup.build(E, experts, index, 0.3 * torch.randn(len(index), k, generator=GEN),
                                                    0.3 * torch.randn(len(index), n, generator=GEN), bits, 8)
    return SlotTable(E, groups)


def dense_corrected(experts: PackedExperts, table: SlotTable, hidden, index, weights) -> torch.Tensor:
    """Token by token in float64 from dequantized weights with the deltas added: rows, then columns."""
    def dense(e: int, p: str) -> torch.Tensor:
        w = dequantized(experts, e, p)
        lowrank = table.groups[(p, "lowrank")]
        mine = lowrank.expert == e
        w += lowrank.b.deltas()[mine].double().T @ lowrank.a.deltas()[mine].double()
        for kind in ("rows", "cols"):
            g = table.groups[(p, kind)]
            mine = g.expert == e
            deltas = g.deltas()[mine].double()
            if kind == "rows":
                w[g.index[mine]] += deltas
            else:
                w[:, g.index[mine]] += deltas.T
        return w

    return dense_moe(experts, hidden, index, weights, dense)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("gather_elements", [1 << 24, 64])   # one gathered chunk, or grouped by expert
def test_slot_table_equals_the_dense_layer_with_corrected_weights(monkeypatch, bits, gather_elements):
    monkeypatch.setattr(slots_module, "GATHER_ELEMENTS", gather_elements)
    experts = random_experts([4, 3, 8, 16, 2], H, I, GEN)
    experts.slot_table = random_table(bits)
    hidden = torch.randn(7, H, generator=GEN)
    index, weights = skewed_routing(7, E, 2, GEN)
    want = dense_corrected(experts, experts.slot_table, hidden, index, weights)
    for got in (moe_experts_ref(experts, hidden, index, weights),
                moe_grouped(experts, hidden, index, weights, grouped_dequant_matmul_ref)):
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    plain = moe_experts_ref(random_experts([4, 3, 8, 16, 2], H, I, torch.Generator().manual_seed(5)), hidden,
                            index, weights)
    assert not torch.allclose(plain.double(), want, atol=1e-3)  # the corrections matter


def test_8_bit_deltas_round_trip_within_half_a_step_and_zeros_stay_zero():
    deltas = torch.randn(6, 40, generator=GEN)
    deltas[2] = 0.0
    codes, scales, zeros = quantize_deltas(deltas, 8, 16)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float16 and scales.shape == (6, 3)
    back = dequantize_deltas(codes, scales, zeros, 16)
    step = scales.float()[:, torch.arange(40) // 16]
    assert bool(((back - deltas).abs() <= 0.5 * step + 1e-6).all())
    assert torch.equal(back[2], torch.zeros(40))


def test_slot_groups_sort_by_expert_and_count_their_bytes():
    group = SlotGroup.build(4, torch.tensor([3, 0, 3, 1]), torch.tensor([5, 2, 1, 0]), torch.randn(4, 16), 8, 8)
    assert group.expert.tolist() == [0, 1, 3, 3] and group.index.tolist() == [2, 0, 1, 5]
    assert group.counts.tolist() == [1, 1, 0, 2] and group.widest == 2
    assert group.nbytes == 4 * 16 + 4 * 2 * 2 * 2 + 4 * 4   # codes, fp16 scale and zero per group, int32 index
    assert group.nbytes == 4 * slot_nbytes(16, 8, 8)        # what a switch's budget spends per slot
    with pytest.raises(ValueError, match="unknown slot group"):
        SlotTable(4, {("gate", "diagonal"): group})


def test_a_low_rank_group_pairs_its_factors_and_costs_one_slot_of_each_length():
    a, b = torch.randn(3, 16, generator=GEN), torch.randn(3, 12, generator=GEN)
    group = LowRankGroup.build(4, torch.tensor([3, 0, 3]), torch.tensor([1, 0, 0]), a, b, 16, 8)
    assert group.expert.tolist() == [0, 3, 3] and group.index.tolist() == [0, 0, 1]
    assert group.nbytes == 3 * (slot_nbytes(16, 16, 8) + slot_nbytes(12, 16, 8))
    factors = group.factors(3)
    assert torch.allclose(factors[0], a[[2, 0]], atol=1e-3) and torch.allclose(factors[1], b[[2, 0]], atol=1e-3)
    assert group.factors(1) is None
    back = LowRankGroup.from_tensors(4, group.tensors(), 8)
    assert torch.equal(back.b.codes, group.b.codes) and torch.equal(back.a.index, group.a.index)
