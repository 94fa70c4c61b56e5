"""One uniform view over the experts of any MoE family.

A family is described by a short declarative `MoEAdapter` (one file per family in this
package) keyed by `config.model_type`; nothing outside the adapters knows a family's
module names. `moe_layers(model)` yields `MoELayer` views that give, per expert, its
gate / up / down weights as 2-D tensors (views into the model's storage, so writes land
in the model) in the `nn.Linear` convention [out_features, in_features].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from dynamo_kernels.projections import PROJECTIONS

from ..errors import UserError

SHARED = "shared"  # the expert key of a layer's shared expert


@dataclass(frozen=True)
class MoEAdapter:
    """Where a family keeps its MoE pieces. Paths are attribute chains ("model.layers")."""

    model_type: str
    storage: Literal["fused_3d", "module_list"]
    n_experts: str                      # config field with the routed-expert count
    top_k: str = "num_experts_per_tok"  # config field with the experts per token
    layers: str = "model.layers"        # the decoder layers, from the CausalLM
    moe: str = "mlp"                    # the MoE block, from a decoder layer
    router: str = "gate"                # from the MoE block
    experts: str = "experts"            # from the MoE block
    shared: str | None = None           # shared-expert MLP (gate_proj/up_proj/down_proj), from the block
    shared_gate: str | None = None      # sigmoid gate scaling the shared expert's output, from the block
    dispatch: str | None = None         # module_list: block method (x, topk_idx, topk_weight) -> y
    refuse: str | None = None           # a family we know but do not support: the reason


_ADAPTERS: dict[str, MoEAdapter] = {}


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    if adapter.model_type in _ADAPTERS:
        raise ValueError(f"an adapter for model_type '{adapter.model_type}' is already registered")
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def registered_adapters() -> dict[str, MoEAdapter]:
    return dict(_ADAPTERS)


def adapter_for(model: nn.Module) -> MoEAdapter:
    return adapter_for_type(getattr(model.config, "model_type", None))


def adapter_for_type(model_type: str | None) -> MoEAdapter:
    """The adapter of a config's model_type (validate.py asks before any weight is loaded)."""
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        supported = ", ".join(t for t, a in sorted(_ADAPTERS.items()) if a.refuse is None)
        raise UserError(f"no MoE adapter for model_type '{model_type}'; supported: {supported} "
                        "(add one file under dynamo/adapters/)")
    if adapter.refuse:
        raise UserError(f"model_type '{model_type}' is not supported: {adapter.refuse}")
    return adapter


def get_path(root: object, path: str | None):
    obj = root
    for name in (path or "").split("."):
        if name:
            obj = getattr(obj, name)
    return obj


@dataclass
class MoELayer:
    """One MoE block: its router, its experts as 2-D weights, its shared expert if any."""

    index: int                # decoder-layer index (dense layers are skipped, indices kept)
    block: nn.Module
    adapter: MoEAdapter
    n_experts: int
    top_k: int

    @property
    def router(self) -> nn.Module:
        return get_path(self.block, self.adapter.router)

    @property
    def experts(self) -> nn.Module:
        return get_path(self.block, self.adapter.experts)

    @property
    def shared_expert(self) -> nn.Module | None:
        return get_path(self.block, self.adapter.shared) if self.adapter.shared else None

    @property
    def shared_expert_gate(self) -> nn.Module | None:
        return get_path(self.block, self.adapter.shared_gate) if self.adapter.shared_gate else None

    @property
    def intermediate_size(self) -> int:
        # fused experts (transformers 5) state their sizes: read them there, not off the weights, which
        # a packed layer (dynamo.packed) may have replaced
        if self.adapter.storage == "fused_3d":
            return int(self.experts.intermediate_dim)
        return self.weight(0, "down").shape[1]

    @property
    def hidden_size(self) -> int:
        if self.adapter.storage == "fused_3d":
            return int(self.experts.hidden_dim)
        return self.weight(0, "down").shape[0]

    def shape(self, projection: str) -> tuple[int, int]:
        """A routed expert's [out, in] for `projection`, from the layer's sizes (no weight read)."""
        hidden, inter = self.hidden_size, self.intermediate_size
        return (hidden, inter) if projection == "down" else (inter, hidden)

    def weight(self, expert: int, projection: str) -> torch.Tensor:
        """Expert weight as [out, in]; a view of the model's storage (writes go into the model)."""
        if not 0 <= expert < self.n_experts:
            raise IndexError(f"expert {expert} out of range (layer {self.index} has {self.n_experts})")
        experts = self.experts
        if self.adapter.storage == "module_list":
            return getattr(experts[expert], f"{projection}_proj").weight.data
        if projection == "down":
            return experts.down_proj.data[expert]
        gate_up = experts.gate_up_proj.data[expert]  # [2I, H]: rows [:I] gate, [I:] up
        half = gate_up.shape[0] // 2
        return gate_up[:half] if projection == "gate" else gate_up[half:]

    def set_weight(self, expert: int, projection: str, value: torch.Tensor) -> None:
        target = self.weight(expert, projection)
        if value.shape != target.shape:
            raise ValueError(f"layer {self.index} expert {expert} {projection}: shape {tuple(value.shape)} "
                             f"!= {tuple(target.shape)}")
        target.copy_(value)

    def matrices(self) -> Iterator[tuple[int | str, str, torch.Tensor]]:
        """(expert, projection, [out, in] weight view) for every routed expert, then the shared one."""
        for e in range(self.n_experts):
            for projection in PROJECTIONS:
                yield e, projection, self.weight(e, projection)
        if self.shared_expert is not None:
            for projection in PROJECTIONS:
                yield SHARED, projection, getattr(self.shared_expert, f"{projection}_proj").weight.data

    def activation(self):
        experts = self.experts
        holder = experts[0] if self.adapter.storage == "module_list" else experts
        return holder.act_fn

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The expert's SwiGLU MLP on routed tokens x [n, H] (reference computation, no router weight)."""
        act = self.activation()
        h = act(x @ self.weight(expert, "gate").T) * (x @ self.weight(expert, "up").T)
        return h @ self.weight(expert, "down").T


def moe_layers(model: nn.Module, adapter: MoEAdapter | None = None) -> Iterator[MoELayer]:
    """Every MoE block in forward order; dense layers (DeepSeek's first, Qwen's mlp_only) are skipped."""
    adapter = adapter or adapter_for(model)
    config = getattr(model.config, "text_config", None) or model.config
    n_experts, top_k = int(getattr(config, adapter.n_experts)), int(getattr(config, adapter.top_k))
    for index, layer in enumerate(get_path(model, adapter.layers)):
        block = get_path(layer, adapter.moe)
        if hasattr(block, adapter.experts):
            yield MoELayer(index=index, block=block, adapter=adapter, n_experts=n_experts, top_k=top_k)
