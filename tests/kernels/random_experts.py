"""Random packed expert layers and routings for the kernel tests (small, odd shapes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamo.packed.weight import pack_weight
from dynamo.quant import QSpec, quantize_rtn
from dynamo_kernels.experts import ExpertWeight, PackedExperts
from dynamo_kernels.packing import PackedWeight


def random_weight(rows: int, cols: int, bits: int, gen: torch.Generator, group_size: int = 16) -> ExpertWeight:
    """A packed RTN weight, or a dense fp32 tensor for bits == 16."""
    w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
    return w if bits == 16 else pack_weight(quantize_rtn(w, QSpec(bits, group_size=group_size)))


def random_experts(bits: list[int], hidden: int, inter: int, gen: torch.Generator, group_size: int = 16,
                   device: str = "cpu") -> PackedExperts:
    """Expert e gets bits[e] for all three projections."""
    def to(w: ExpertWeight) -> ExpertWeight:
        return w.to(device)

    gate = [to(random_weight(inter, hidden, b, gen, group_size)) for b in bits]
    up = [to(random_weight(inter, hidden, b, gen, group_size)) for b in bits]
    down = [to(random_weight(hidden, inter, b, gen, group_size)) for b in bits]
    return PackedExperts.build(gate, up, down, F.silu)


def skewed_routing(tokens: int, n_experts: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and weights where expert 0 takes every token (several row blocks) and the last expert none."""
    rest = torch.stack([torch.randperm(n_experts - 2, generator=gen)[:k - 1] + 1 for _ in range(tokens)])
    index = torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), rest], dim=1)
    weights = torch.rand(tokens, k, generator=gen).softmax(-1)
    return index, weights


def dequantized(experts: PackedExperts, expert: int, projection: str) -> torch.Tensor:
    """One expert matrix as float64 (a fresh tensor)."""
    w = experts.weight(expert, projection)
    return (w.dequantize() if isinstance(w, PackedWeight) else w).double().clone()


def dense_moe(experts: PackedExperts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
              dense=None) -> torch.Tensor:
    """Token by token in float64 from the dequantized weights (or `dense(expert, projection)`, the matrices a
    test expects the layer to compute with): the plain definition, no shared code path."""
    dense = dense or (lambda e, p: dequantized(experts, e, p))
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = F.silu(dense(e, "gate") @ x) * (dense(e, "up") @ x)
            out[t] += float(weights[t, j]) * (dense(e, "down") @ h)
    return out
