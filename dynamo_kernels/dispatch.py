"""Pick the backend for packed-weight compute: Triton where it can run, the torch reference elsewhere.

Triton runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 is set (it must be set
before triton is first imported in the process; see triton_matmul.py). Everything else uses the
torch reference, so a packed model runs on any machine. triton is imported only when chosen.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .experts import PackedExperts
from .packing import PackedWeight
from .reference import dense_matmul, dequant_matmul_ref, moe_experts_ref, with_channels

Backend = Literal["triton", "torch"]
BACKENDS = ("triton", "torch")


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def backend_for(device: torch.device) -> Backend:
    return "triton" if device.type == "cuda" or interpreter_requested() else "torch"


def _resolve(backend: Backend | None, device: torch.device) -> Backend:
    if backend is None:
        return backend_for(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return backend


def dequant_matmul(x: torch.Tensor, w: PackedWeight, *, backend: Backend | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(w)^T."""
    if _resolve(backend, x.device) == "torch":
        return dequant_matmul_ref(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    from .triton_matmul import dequant_matmul_triton

    return dequant_matmul_triton(x, w)


def expert_linear(experts: PackedExperts, expert: int, projection: str, x: torch.Tensor, *,
                  backend: Backend | None = None) -> torch.Tensor:
    """x [m, K] @ W^T for one expert projection of a packed layer, its cached full-precision rows included."""
    w = experts.weight(expert, projection)
    y = dequant_matmul(x, w, backend=backend) if isinstance(w, PackedWeight) else dense_matmul(x, w)
    return with_channels(experts, expert, projection, x, y)


def moe_experts(experts: PackedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, *, backend: Backend | None = None) -> torch.Tensor:
    """A layer's routed experts: hidden [T, H], top-k ids and weights [T, k] -> [T, H]."""
    if _resolve(backend, hidden.device) == "torch":
        return moe_experts_ref(experts, hidden, top_k_index, top_k_weights)
    from .moe import moe_experts as moe_grouped
    from .triton_matmul import grouped_dequant_matmul_triton

    return moe_grouped(experts, hidden, top_k_index, top_k_weights, grouped_dequant_matmul_triton)
