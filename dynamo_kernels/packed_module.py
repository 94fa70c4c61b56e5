"""A packed MoE layer as an nn.Module: its tensors become parameters, so the model saves, moves and reloads them.

`PackedExpertsModule` holds one child per `WeightStack` (parameters `experts`, `col_offsets`,
and `qweight` / `scales` / `zeros`, or `dense` for a 16-bit stack) and, when the layer has
them, the channel rows (`index_<projection>`, `values_<projection>`). Integer tensors are
parameters too (requires_grad=False): transformers' loader fills parameters by name and keeps
their dtype, which is what a pre-quantized checkpoint needs.

`experts()` rebuilds the light `PackedExperts` view from the current parameters on every
call, so moving the model (`.to("cuda")`) or loading into it needs no extra step.

A layer's `layout` (plain JSON: per projection each expert's [bits, group_size], the channel
rows per projection, the sizes) is what a quantization config stores; `skeleton(layout)` builds
a module with empty (meta) parameters of exactly the saved shapes, for loading.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .channels import ChannelRows
from .experts import DENSE_BITS, ExpertWeight, PackedExperts, WeightStack
from .packing import PackedWeight, packed_columns
from .projections import PROJECTIONS

STACK_TENSORS = ("experts", "col_offsets", "qweight", "scales", "zeros", "dense")


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class PackedExpertsModule(nn.Module):
    def __init__(self, packed: PackedExperts):
        super().__init__()
        self.n_experts, self.hidden_size = packed.n_experts, packed.hidden_size
        self.intermediate_size = packed.intermediate_size
        self.act = packed.act
        self._signatures = {stage: [(s.bits, s.group_size, s.shape) for s in stacks]
                            for stage, stacks in packed.stages.items()}
        self._where = dict(packed._where)
        self.stacks = nn.ModuleDict()
        for stage, stacks in packed.stages.items():
            for i, stack in enumerate(stacks):
                child = nn.Module()
                for name in STACK_TENSORS:
                    if getattr(stack, name) is not None:
                        child.register_parameter(name, _parameter(getattr(stack, name)))
                self.stacks[f"{stage}_{i}"] = child
        self.slot_table = packed.slot_table  # the adaptive switch's slots: replaced whole by each switch
        self.channels = None
        if packed.channels is not None:
            self.channels = nn.Module()
            for p in PROJECTIONS:
                self.channels.register_parameter(f"index_{p}", _parameter(packed.channels.index[p]))
                self.channels.register_parameter(f"values_{p}", _parameter(packed.channels.values[p]))

    def experts(self) -> PackedExperts:
        """The layer as the kernels read it, viewing the current parameters."""
        stages = {}
        for stage, signatures in self._signatures.items():
            stages[stage] = []
            for i, (bits, group_size, shape) in enumerate(signatures):
                child = self.stacks[f"{stage}_{i}"]
                tensors = {name: getattr(child, name) for name in STACK_TENSORS if hasattr(child, name)}
                stages[stage].append(WeightStack(bits, group_size, shape, **tensors))
        channels = None
        if self.channels is not None:
            channels = ChannelRows({p: getattr(self.channels, f"index_{p}") for p in PROJECTIONS},
                                   {p: getattr(self.channels, f"values_{p}") for p in PROJECTIONS})
        return PackedExperts(self.n_experts, self.hidden_size, self.intermediate_size, self.act, stages,
                             self._where, channels, self.slot_table)

    @property
    def layout(self) -> dict:
        return layout_of(self.experts())


def layout_of(packed: PackedExperts) -> dict:
    """What a quantization config stores to rebuild the layer's parameter shapes (plain JSON)."""
    def spec(e: int, p: str) -> list[int]:
        w = packed.weight(e, p)
        return [w.bits, w.group_size] if isinstance(w, PackedWeight) else [DENSE_BITS, -1]

    channels = packed.channels
    return {"experts": packed.n_experts, "hidden_size": packed.hidden_size,
            "intermediate_size": packed.intermediate_size,
            "widths": {p: [spec(e, p) for e in range(packed.n_experts)] for p in PROJECTIONS},
            "channel_rows": {p: int(channels.index[p].shape[1]) if channels is not None else 0 for p in PROJECTIONS}}


def _empty(bits: int, group_size: int, shape: tuple[int, int], dtype: torch.dtype) -> ExpertWeight:
    """A meta-device matrix of the format's tensor shapes and dtypes (packing.py's layout)."""
    if bits == DENSE_BITS:
        return torch.empty(shape, dtype=dtype, device="meta")
    rows, cols = shape
    groups = 1 if group_size == -1 else -(-cols // group_size)
    return PackedWeight(torch.empty(rows, packed_columns(cols, bits), dtype=torch.int32, device="meta"),
                        torch.empty(rows, groups, dtype=torch.float16, device="meta"),
                        torch.empty(groups, packed_columns(rows, bits), dtype=torch.int32, device="meta"),
                        bits=bits, group_size=group_size, shape=shape)


def skeleton(layout: dict, act: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> PackedExpertsModule:
    """A module with empty (meta) parameters of the shapes `layout` describes: the target of a load."""
    try:
        n, hidden, inter = int(layout["experts"]), int(layout["hidden_size"]), int(layout["intermediate_size"])
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        weights = {p: [_empty(int(bits), int(group), shapes[p], dtype) for bits, group in layout["widths"][p]]
                   for p in PROJECTIONS}
        rows = {p: int(layout["channel_rows"][p]) for p in PROJECTIONS}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed packed-layer layout ({err!r}); the quantization config was not written by "
                         f"dynamo.packed.model.attach_packed") from None
    channels = None
    if any(rows.values()):
        channels = ChannelRows({p: torch.empty(n, rows[p], dtype=torch.int64, device="meta") for p in PROJECTIONS},
                               {p: torch.empty(n, rows[p], shapes[p][1], dtype=dtype, device="meta")
                                for p in PROJECTIONS})
    return PackedExpertsModule(PackedExperts.build(weights["gate"], weights["up"], weights["down"], act, channels))

