"""Run a model's routed experts from packed low-bit weights, through the model's own forward.

    report = apply_plan(model, plan, keep_codes=True)     # codes per (layer, expert, projection)
    packed = pack_experts(model, report.codes)            # {layer index: PackedExperts}
    release_dense_experts(model)                          # optional: drop the dense expert copies
    with packed_forward(model, packed):
        logits = model(input_ids).logits

`packed_forward` routes every MoE layer's expert computation through `kernels.dispatch`
(Triton on CUDA, the torch reference on CPU) with `dynamo.adapters.expert_compute`, so
attention, routers and shared experts run unchanged. Only routed experts are packed: shared
experts stay in the model (fake-quantized by apply_plan when the plan quantizes them).
Projections a plan keeps at 16 bits have no codes and stay dense (torch computes them).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dynamo.adapters import PROJECTIONS, MoELayer, moe_layers
from dynamo.adapters.compute import expert_compute
from dynamo.quant.rtn import QuantizedWeight

from .dispatch import Backend, moe_experts
from .experts import ExpertWeight, PackedExperts
from .packing import PackedWeight

CodeKey = tuple[int, int | str, str]  # (layer index, expert, projection), as in QuantReport.codes


def pack_layer(layer: MoELayer, codes: dict[CodeKey, QuantizedWeight]) -> PackedExperts:
    weights: dict[str, list[ExpertWeight]] = {p: [] for p in PROJECTIONS}
    for expert in range(layer.n_experts):
        for projection in PROJECTIONS:
            dense = layer.weight(expert, projection)
            q = codes.get((layer.index, expert, projection))
            weights[projection].append(PackedWeight.from_quantized(q).to(dense.device) if q is not None
                                       else dense.detach().clone())
    return PackedExperts.build(weights["gate"], weights["up"], weights["down"], layer.activation())


def pack_experts(model: nn.Module, codes: dict[CodeKey, QuantizedWeight]) -> dict[int, PackedExperts]:
    """Every MoE layer's routed experts, packed from `QuantReport.codes` (16-bit ones kept dense)."""
    return {layer.index: pack_layer(layer, codes) for layer in moe_layers(model)}


def write_dequantized(model: nn.Module, packed: dict[int, PackedExperts]) -> None:
    """Fake-quantize the model with exactly the packed values (fp16 scales): the packed forward's reference."""
    for layer in moe_layers(model):
        for expert in range(layer.n_experts):
            for projection in PROJECTIONS:
                w = packed[layer.index].weight(expert, projection)
                if isinstance(w, PackedWeight):
                    layer.set_weight(expert, projection, w.dequantize(layer.weight(expert, projection).dtype))


@torch.no_grad()
def release_dense_experts(model: nn.Module) -> int:
    """Empty the model's dense routed-expert tensors (after packing); returns the bytes freed.

    The model then only runs inside `packed_forward`; a plain forward fails on the empty tensors.
    """
    freed = 0
    for layer in moe_layers(model):
        experts = layer.experts
        if layer.adapter.storage == "fused_3d":
            params = [experts.gate_up_proj, experts.down_proj]
        else:
            params = [getattr(expert, f"{p}_proj").weight for expert in experts for p in PROJECTIONS]
        for param in params:
            freed += param.numel() * param.element_size()
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return freed


@contextmanager
def packed_forward(model: nn.Module, packed: dict[int, PackedExperts], *,
                   backend: Backend | None = None) -> Iterator[list[MoELayer]]:
    """Within the block, routed experts run from `packed` (Triton where available, else torch)."""
    def compute(layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return moe_experts(packed[layer.index], hidden, top_k_index, top_k_weights, backend=backend)

    with expert_compute(model, compute) as layers:
        yield layers
