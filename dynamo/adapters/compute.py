"""Plug a custom expert computation into any adapted model, then take it out again.

Fused families dispatch through transformers' experts registry (`ALL_EXPERTS_FUNCTIONS`):
we register one entry, "dynamo", that forwards to a per-module callable. ModuleList
families (DeepSeek-MoE remote code) get their block's dispatch method replaced on the
instance. Either way the callable sees exactly what the model's experts see: the tokens
of one MoE block, [N, H], with their top-k expert ids and router weights, [N, k].
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from .base import MoELayer, moe_layers

ExpertCompute = Callable[[MoELayer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IMPLEMENTATION = "dynamo"
_HOOK = "_dynamo_expert_compute"


def _registered_dispatch(self, hidden_states, top_k_index, top_k_weights):
    return getattr(self, _HOOK)(hidden_states, top_k_index, top_k_weights)


def _register_once() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _registered_dispatch)


def routed_forward(layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The plain routed-expert computation: sum over a token's experts of weight * expert(x)."""
    out = torch.zeros_like(hidden)
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        y = layer.expert_forward(expert, hidden[token])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _flat_dispatch(fn: ExpertCompute, layer: MoELayer, x: torch.Tensor, flat_index: torch.Tensor,
                   flat_weight: torch.Tensor) -> torch.Tensor:
    """DeepSeek-MoE's `moe_infer(x, idx [N*k], weight [N*k, 1])`, reshaped to the [N, k] convention."""
    return fn(layer, x, flat_index.view(x.shape[0], -1), flat_weight.view(x.shape[0], -1))


@contextmanager
def expert_compute(model: nn.Module, fn: ExpertCompute) -> Iterator[list[MoELayer]]:
    """Within the block, every MoE layer's routed experts run `fn(layer, hidden, idx, weights)`."""
    layers = list(moe_layers(model))
    fused = [layer for layer in layers if layer.adapter.storage == "fused_3d"]
    previous = getattr(model.config, "_experts_implementation", None)
    try:
        for layer in layers:
            if layer.adapter.storage == "fused_3d":
                setattr(layer.experts, _HOOK, partial(fn, layer))
            else:
                setattr(layer.block, layer.adapter.dispatch, partial(_flat_dispatch, fn, layer))
        if fused:
            _register_once()
            model.set_experts_implementation(IMPLEMENTATION)
        yield layers
    finally:
        if fused and previous is not None:
            model.set_experts_implementation(previous)
        for layer in layers:
            owner, name = ((layer.experts, _HOOK) if layer.adapter.storage == "fused_3d"
                           else (layer.block, layer.adapter.dispatch))
            if name in vars(owner):
                delattr(owner, name)
