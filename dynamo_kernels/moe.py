"""A whole MoE layer's routed experts on packed weights: one grouped launch per WeightStack.

    gate_up [T*k, 2I] = x[token] @ W^T for each stack of stage "gate_up" (gate -> [:I], up -> [I:])
    h       [T*k, I]  = act(gate_up[:, :I]) * gate_up[:, I:]                        (torch)
    y       [T*k, H]  = h @ W^T for each stack of stage "down"
    out     [T, H]    = sum_j top_k_weights[t, j] * y[t * k + j], in fp32           (torch)

Row t * k + j is token t's j-th routed expert. A layer costs one launch per stack (per distinct
bit-width and stage: 2 x the number of widths when each expert has one width) plus the torch
glue: routing sort, block tables, SwiGLU and the weighted sum. This is the per-projection
building block with a torch composition; gate, up and down are not fused into one kernel
(a fused SwiGLU kernel would save the gate_up round trip, [T*k, 2I] values, small next to the
weights at decode sizes). 16-bit (dense) stacks run through torch, and so do the cached
full-precision channel rows (channels.py): after each stage, every routed row's cached outputs
are recomputed from their values and written over the packed outputs (a gather, a batched
matmul and a scatter per projection, with no host synchronisation).
"""

from __future__ import annotations

from typing import Callable

import torch

from .experts import STAGES, PackedExperts, Routing, WeightStack
from .reference import grouped_dequant_matmul_ref

GroupedMatmul = Callable[[torch.Tensor, WeightStack, Routing, int, torch.Tensor], torch.Tensor]


def _run_stage(stacks: list[WeightStack], x: torch.Tensor, routing: Routing, in_div: int, out: torch.Tensor,
               grouped: GroupedMatmul) -> None:
    for stack in stacks:
        (grouped_dequant_matmul_ref if stack.is_dense else grouped)(x, stack, routing, in_div, out)


def _patch_channels(experts: PackedExperts, stage: str, x: torch.Tensor, top_k_index: torch.Tensor, in_div: int,
                    out: torch.Tensor) -> None:
    """Overwrite the cached full-precision rows' outputs of every routed row, then add the adaptive
    switch's slot corrections (torch; both ~1% of the weights)."""
    if experts.channels is None and experts.slot_table is None:
        return
    row_experts = top_k_index.reshape(-1)  # row t * k + j is token t's j-th expert
    for projection in STAGES[stage]:
        offset = experts.intermediate_size if projection == "up" else 0
        if experts.channels is not None:
            experts.channels.patch_rows(projection, row_experts, x, in_div, out, offset)
        if experts.slot_table is not None:
            width = experts.hidden_size if projection == "down" else experts.intermediate_size
            experts.slot_table.add(projection, row_experts, x, in_div, out, offset, width)


def moe_experts(experts: PackedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, grouped: GroupedMatmul) -> torch.Tensor:
    """hidden [T, H], top_k_index / top_k_weights [T, k] -> the routed experts' output [T, H]."""
    tokens, k = top_k_index.shape
    if hidden.shape != (tokens, experts.hidden_size):
        raise ValueError(f"hidden must be [{tokens}, {experts.hidden_size}], got {tuple(hidden.shape)}")
    routing = Routing.build(top_k_index, experts.n_experts)
    inter = experts.intermediate_size
    gate_up = torch.empty(tokens * k, 2 * inter, dtype=hidden.dtype, device=hidden.device)
    _run_stage(experts.stages["gate_up"], hidden, routing, k, gate_up, grouped)
    _patch_channels(experts, "gate_up", hidden, top_k_index, k, gate_up)
    h = experts.act(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch.empty(tokens * k, experts.hidden_size, dtype=hidden.dtype, device=hidden.device)
    h = h.contiguous()
    _run_stage(experts.stages["down"], h, routing, 1, y, grouped)
    _patch_channels(experts, "down", h, top_k_index, 1, y)
    return (y.view(tokens, k, -1).float() * top_k_weights.float()[..., None]).sum(1).to(hidden.dtype)
