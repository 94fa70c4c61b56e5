"""Run a model's routed experts from packed low-bit weights, through the model's own forward.

Two ways, from the same packed layers:

    report = apply_plan(model, plan, keep_codes=True)     # codes per (layer, expert, projection)
    packed = pack_experts(model, report.codes, cache)     # {layer index: PackedExperts}; cache optional

    # 1. persistent (fused-expert families, i.e. every transformers-5 MoE): the packed tensors
    #    replace the dense expert parameters; the model saves and reloads with them
    attach_packed(model, packed)
    model.save_pretrained(path)                           # + quantization_config "dynamo"
    model = load_packed(path)                             # dynamo.packed.hf_quantizer

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
from typing import Iterator

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
from ..switching.cache import SLICES, ChannelCache
from .weight import pack_weight

CodeKey = tuple[int, int | str, str]  # (layer index, expert, projection), as in QuantReport.codes
IMPLEMENTATION = "dynamo_packed"
ATTRIBUTE = "packed"  # the experts module's child that holds an attached packed layer


def _channel_rows(layer: MoELayer, cache: ChannelCache) -> ChannelRows:
    if any(axis != 0 for _, axis in SLICES[cache.unit].values()):
        raise UserError(f"a packed model keeps cached channels as output rows; this cache's unit is "
                        f"'{cache.unit}' (a neuron's down slice is a column). Build it with analysis.channel_unit=row")
    index = {p: cache.index[layer.index][SLICES[cache.unit][p][0]].long().to(layer.weight(0, p).device)
             for p in PROJECTIONS}
    return ChannelRows.from_weights(index, lambda e, p: layer.weight(e, p).detach())


def pack_layer(layer: MoELayer, codes: dict[CodeKey, QuantizedWeight], cache: ChannelCache | None = None
               ) -> PackedExperts:
    weights: dict[str, list[ExpertWeight]] = {p: [] for p in PROJECTIONS}
    for expert in range(layer.n_experts):
        for projection in PROJECTIONS:
            dense = layer.weight(expert, projection)
            q = codes.get((layer.index, expert, projection))
            weights[projection].append(pack_weight(q).to(dense.device) if q is not None
                                       else dense.detach().clone())
    channels = _channel_rows(layer, cache) if cache is not None else None
    return PackedExperts.build(weights["gate"], weights["up"], weights["down"], layer.activation(), channels)


def pack_experts(model: nn.Module, codes: dict[CodeKey, QuantizedWeight], cache: ChannelCache | None = None
                 ) -> dict[int, PackedExperts]:
    """Every MoE layer's routed experts, packed from `QuantReport.codes` (16-bit ones kept dense).

    With a channel cache, each layer also keeps the cache's rows as the model holds them now.
    """
    if cache is not None:
        cache.validate(model)
    return {layer.index: pack_layer(layer, codes, cache) for layer in moe_layers(model)}


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


# --- attached (persistent) packed layers ---------------------------------------------------------


def _packed_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts implementation "dynamo_packed": the module's attached packed layer."""
    return moe_experts(getattr(self, ATTRIBUTE).experts(), hidden_states, top_k_index, top_k_weights)


def use_packed_implementation(model: nn.Module) -> None:
    """Route every attached layer's experts through `_packed_experts_forward` (registered once)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _packed_experts_forward)
    model.set_experts_implementation(IMPLEMENTATION)


def _check_fused(layer: MoELayer) -> None:
    if layer.adapter.storage != "fused_3d":
        raise UserError(f"attach_packed needs fused 3-D experts (transformers-5 MoE classes); layer {layer.index} "
                        f"keeps its experts in a ModuleList. Run it with `packed_forward` instead")


def install_packed(layer: MoELayer, module: PackedExpertsModule) -> None:
    """Replace the layer's dense expert parameters with `module` (the packed experts' parameters)."""
    _check_fused(layer)
    experts = layer.experts
    for name in ("gate_up_proj", "down_proj"):
        if hasattr(experts, name):
            delattr(experts, name)
    setattr(experts, ATTRIBUTE, module)
    # transformers (re-)initialises modules it believes were not loaded; its initialiser for this
    # class would look for the dense parameters that are gone.
    experts._is_hf_initialized = True


@torch.no_grad()
def attach_packed(model: nn.Module, packed: dict[int, PackedExperts]) -> None:
    """Make the packed layers part of the model: their tensors become the experts' parameters (the dense
    ones are dropped), the model's forward runs them, and `save_pretrained` writes them with a
    quantization config that `dynamo.packed.hf_quantizer.load_packed` (or from_pretrained) reads back."""
    from .hf_quantizer import DynamoPackedConfig

    layers = list(moe_layers(model))
    for layer in layers:
        _check_fused(layer)
        if layer.index not in packed:
            raise UserError(f"no packed experts for MoE layer {layer.index}; pack_experts covers {sorted(packed)}")
    modules = {layer.index: PackedExpertsModule(packed[layer.index]) for layer in layers}
    for layer in layers:
        install_packed(layer, modules[layer.index])
    use_packed_implementation(model)
    model.config.quantization_config = DynamoPackedConfig(
        layers={str(i): module.layout for i, module in modules.items()})


def attached_packed(layer: MoELayer) -> PackedExpertsModule | None:
    """The packed layer that `attach_packed` put in place of the layer's dense expert weights, if any."""
    return getattr(layer.experts, ATTRIBUTE, None) if layer.adapter.storage == "fused_3d" else None


def packed_modules(model: nn.Module) -> dict[int, PackedExpertsModule]:
    """The attached packed layers of a model, by MoE layer index."""
    found = {layer.index: attached_packed(layer) for layer in moe_layers(model)}
    if not found or any(m is None for m in found.values()):
        raise UserError("the model has no attached packed experts (see dynamo.packed.model.attach_packed)")
    return found
