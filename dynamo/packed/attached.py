"""Attached packed layers: the packed experts as the model's own parameters, run by its own forward.

`install_packed` swaps one MoE layer's dense expert parameters for a `PackedExpertsModule`;
`use_packed_implementation` makes transformers' experts registry run them ("dynamo_packed"). Both
`dynamo.packed.model.attach_packed` (after packing) and the checkpoint loader
(`dynamo.packed.format`, before the weights load) go through here, so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamo_kernels.dispatch import moe_experts
from dynamo_kernels.packed_module import PackedExpertsModule

from ..adapters import MoELayer, moe_layers
from ..errors import UserError

IMPLEMENTATION = "dynamo_packed"
ATTRIBUTE = "packed"  # the experts module's child that holds an attached packed layer


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


def check_fused(layer: MoELayer) -> None:
    if layer.adapter.storage != "fused_3d":
        raise UserError(f"attach_packed needs fused 3-D experts (transformers-5 MoE classes); layer {layer.index} "
                        f"keeps its experts in a ModuleList. Run it with `packed_forward` instead")


def install_packed(layer: MoELayer, module: PackedExpertsModule) -> None:
    """Replace the layer's dense expert parameters with `module` (the packed experts' parameters)."""
    check_fused(layer)
    experts = layer.experts
    for name in ("gate_up_proj", "down_proj"):
        if hasattr(experts, name):
            delattr(experts, name)
    setattr(experts, ATTRIBUTE, module)
    # transformers (re-)initialises modules it believes were not loaded; its initialiser for this
    # class would look for the dense parameters that are gone.
    experts._is_hf_initialized = True


def attached_packed(layer: MoELayer) -> PackedExpertsModule | None:
    """The packed layer that `attach_packed` put in place of the layer's dense expert weights, if any."""
    return getattr(layer.experts, ATTRIBUTE, None) if layer.adapter.storage == "fused_3d" else None


def packed_modules(model: nn.Module) -> dict[int, PackedExpertsModule]:
    """The attached packed layers of a model, by MoE layer index."""
    found = {layer.index: attached_packed(layer) for layer in moe_layers(model)}
    if not found or any(m is None for m in found.values()):
        raise UserError("the model has no attached packed experts (see dynamo.packed.model.attach_packed)")
    return found
