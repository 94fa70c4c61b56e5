"""Run a model's routed experts from packed low-bit weights, through the model's own forward.

Two ways, from the same packed layers:

    report = apply_plan(model, plan, keep_codes=True)     # codes per (layer, expert, projection)
    packed = pack_experts(model, report.codes, cache)     # {layer index: PackedExperts}; cache optional

    # 1. persistent (fused-expert families, i.e. every transformers-5 MoE): the packed tensors
    #    replace the dense expert parameters; the model saves and reloads with them
    attach_packed(model, packed)
    model.save_pretrained(path)                           # + quantization_config "dynamo"
    model = load_packed(path)                             # dynamo.packed.format

    # 2. temporary (any family, remote-code ModuleList ones included)
    release_dense_experts(model)                          # optional: drop the dense expert copies
    with packed_forward(model, packed):
        logits = model(input_ids).logits

Either way the experts run through `dynamo_kernels.dispatch` (Triton on CUDA, the torch reference on
CPU) from the model's own forward: attached layers through transformers' experts registry
(implementation "dynamo_packed"), temporary ones through `dynamo.adapters.expert_compute`.
Attention, routers and shared experts run unchanged. Only routed experts are packed: shared
experts stay in the model (fake-quantized by apply_plan when the plan quantizes them).
Projections a plan keeps at 16 bits have no codes and stay dense (torch computes them).

With a DQS channel cache (row unit), each layer also keeps the cached rows at the model's
dtype (`ChannelRows`): they start as what the model holds there when it is packed, and a
switch rewrites them in place (`dynamo.packed.switching`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

import torch
from torch import nn

from dynamo_kernels.channels import ChannelRows
from dynamo_kernels.dispatch import Backend, moe_experts
from dynamo_kernels.experts import ExpertWeight, PackedExperts
from dynamo_kernels.packed_module import PackedExpertsModule
from dynamo_kernels.packing import PackedWeight

from ..adapters import PROJECTIONS, MoELayer, moe_layers
from ..adapters.compute import expert_compute
from ..errors import UserError
from ..quant.rtn import QuantizedWeight
from .attached import attached_packed, check_fused, install_packed, packed_modules, use_packed_implementation
from .format import DynamoPackedConfig
from .weight import pack_weight

# attached_packed, packed_modules, install_packed, use_packed_implementation: imported from here by callers
# written before dynamo.packed.attached existed
__all__ = ["CodeKey", "ChannelSource", "attach_packed", "attached_packed", "install_packed", "pack_experts",
           "pack_layer", "packed_forward", "packed_modules", "release_dense_experts", "use_packed_implementation",
           "write_dequantized"]

CodeKey = tuple[int, int | str, str]  # (layer index, expert, projection), as in QuantReport.codes
RowIndex = dict[str, torch.Tensor]    # projection -> [experts, k] output-row indices of one layer


class ChannelSource(Protocol):
    """What packing reads of a DQS channel cache (dynamo.switching.cache.ChannelCache is one): which
    output rows of each expert a layer keeps at the model's dtype. A protocol, so the packed layout
    depends on no switching policy; the policy's cache depends on it."""

    def output_rows(self, model: nn.Module) -> dict[int, RowIndex]:
        """Per MoE layer, per projection, the kept rows; refuses (UserError) a model it does not fit."""
        ...


def _channel_rows(layer: MoELayer, rows: RowIndex) -> ChannelRows:
    index = {p: rows[p].long().to(layer.weight(0, p).device) for p in PROJECTIONS}
    return ChannelRows.from_weights(index, lambda e, p: layer.weight(e, p).detach())


def pack_layer(layer: MoELayer, codes: dict[CodeKey, QuantizedWeight], rows: RowIndex | None = None
               ) -> PackedExperts:
    weights: dict[str, list[ExpertWeight]] = {p: [] for p in PROJECTIONS}
    for expert in range(layer.n_experts):
        for projection in PROJECTIONS:
            dense = layer.weight(expert, projection)
            q = codes.get((layer.index, expert, projection))
            weights[projection].append(pack_weight(q).to(dense.device) if q is not None
                                       else dense.detach().clone())
    channels = _channel_rows(layer, rows) if rows is not None else None
    return PackedExperts.build(weights["gate"], weights["up"], weights["down"], layer.activation(), channels)


def pack_experts(model: nn.Module, codes: dict[CodeKey, QuantizedWeight], cache: ChannelSource | None = None
                 ) -> dict[int, PackedExperts]:
    """Every MoE layer's routed experts, packed from `QuantReport.codes` (16-bit ones kept dense).

    With a channel cache, each layer also keeps the cache's rows as the model holds them now.
    """
    rows = cache.output_rows(model) if cache is not None else {}
    return {layer.index: pack_layer(layer, codes, rows.get(layer.index)) for layer in moe_layers(model)}


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


# --- attached (persistent) packed layers (the mechanics: dynamo.packed.attached) -------------------

@torch.no_grad()
def attach_packed(model: nn.Module, packed: dict[int, PackedExperts]) -> None:
    """Make the packed layers part of the model: their tensors become the experts' parameters (the dense
    ones are dropped), the model's forward runs them, and `save_pretrained` writes them with a
    quantization config that `dynamo.packed.format.load_packed` (or from_pretrained) reads back."""
    layers = list(moe_layers(model))
    for layer in layers:
        check_fused(layer)
        if layer.index not in packed:
            raise UserError(f"no packed experts for MoE layer {layer.index}; pack_experts covers {sorted(packed)}")
    modules = {layer.index: PackedExpertsModule(packed[layer.index]) for layer in layers}
    for layer in layers:
        install_packed(layer, modules[layer.index])
    use_packed_implementation(model)
    model.config.quantization_config = DynamoPackedConfig(
        layers={str(i): module.layout for i, module in modules.items()})
