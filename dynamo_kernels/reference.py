"""PyTorch references for every kernel: unpack -> dequantize -> matmul. Also the CPU fallback.

Each reference does the kernel's arithmetic, not just its math: the dequantized weight is
rounded to the activations' dtype (the kernel casts it before `tl.dot`) and products are
accumulated in fp32, so a kernel and its reference differ only by summation order.
"""

from __future__ import annotations

import torch

from .experts import ExpertWeight, PackedExperts, Routing, WeightStack
from .packing import PackedWeight


def dense_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T for an unquantized weight, accumulated in fp32."""
    return (x.float() @ w.to(x.dtype).float().T).to(x.dtype)


def dequant_matmul_ref(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantize(w)^T (reference of `triton_matmul.dequant_matmul_triton`)."""
    return dense_matmul(x, w.dequantize(x.dtype))


def linear_ref(x: torch.Tensor, w: ExpertWeight) -> torch.Tensor:
    return dequant_matmul_ref(x, w) if isinstance(w, PackedWeight) else dense_matmul(x, w)


def with_channels(experts: PackedExperts, expert: int, projection: str, x: torch.Tensor,
                  y: torch.Tensor, slots: bool = True) -> torch.Tensor:
    """y = x @ W^T from the codes, with the layer's cached full-precision rows (if any) written over and
    its slot corrections (if any, and `slots`) added."""
    if experts.channels is not None:
        experts.channels.patch(projection, expert, x, y)
    if slots and experts.slot_table is not None:
        experts.slot_table.add_expert(projection, expert, x, y)
    return y


def expert_linear_ref(experts: PackedExperts, expert: int, projection: str, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T for one expert projection, its cached full-precision rows and slot corrections included.
    The reference dequantizes the whole matrix anyway, so slot corrections are folded into it (no extra
    matmul); the grouped kernels' path adds them to the outputs instead (slots.py)."""
    w = experts.weight(expert, projection)
    table = experts.slot_table
    if table is None or not table.covers(projection, expert):
        return with_channels(experts, expert, projection, x, linear_ref(x, w))
    dense = w.dequantize(torch.float32) if isinstance(w, PackedWeight) else w.float().clone()
    table.fold(projection, expert, dense)
    return with_channels(experts, expert, projection, x, dense_matmul(x, dense.to(x.dtype)), slots=False)


def grouped_dequant_matmul_ref(x: torch.Tensor, stack: WeightStack, routing: Routing, in_div: int,
                               out: torch.Tensor) -> torch.Tensor:
    """For each slot s and each row r routed to its expert: out[r, off_s : off_s + N] = x[r // in_div] @ W_s^T.

    Reference of `triton_matmul.grouped_dequant_matmul_triton`; rows not routed to the stack's
    experts are left untouched.
    """
    n = stack.shape[0]
    for slot in range(stack.slots):
        rows = routing.rows_of(int(stack.experts[slot]))
        if rows.numel():
            offset = int(stack.col_offsets[slot])
            out[rows, offset:offset + n] = linear_ref(x[rows // in_div], stack.weight(slot))
    return out


def moe_experts_ref(experts: PackedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """A layer's routed experts, expert by expert: sum_j w_tj * down(act(gate(x_t)) * up(x_t))."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        x = hidden[token]
        h = experts.act(expert_linear_ref(experts, expert, "gate", x)) * expert_linear_ref(experts, expert, "up", x)
        y = expert_linear_ref(experts, expert, "down", h)
        out.index_add_(0, token, y.float() * top_k_weights[token, slot, None].float())
    return out.to(hidden.dtype)
