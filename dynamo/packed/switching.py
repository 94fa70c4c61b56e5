"""DQS on a packed model: the switch rewrites the packed layers' channel rows in place.

    attach_packed(model, pack_experts(model, report.codes, cache))
    switcher = DynamicSwitcher(model, plan, significance, cache, allocation,
                               store=PackedChannelStore(model, cache))
    switcher.switch_to(windows)

`PackedChannelStore` is the switcher's view of the cached channels (dynamo.switching.store): a
packed layer keeps them as `ChannelRows` (dynamo_kernels/channels.py) whose values are parameters of
the model; a write copies into them, so no buffer is reallocated and the packed codes are never
touched. Profiling a new sample runs the packed experts themselves (`packed_expert_outputs`).
"""

from __future__ import annotations

import torch

from dynamo_kernels.dispatch import expert_linear

from ..adapters import PROJECTIONS, MoELayer
from ..errors import UserError
from ..switching.cache import SLICES, ChannelCache
from ..switching.store import Key
from .model import attached_packed, packed_modules


def packed_expert_outputs(layer: MoELayer, expert: int, x: torch.Tensor) -> dict:
    """The outputs `dynamo.calibration.capture` records, computed from the attached packed layer."""
    experts = attached_packed(layer).experts()
    gate, up = expert_linear(experts, expert, "gate", x), expert_linear(experts, expert, "up", x)
    neuron = experts.act(gate) * up
    return {"gate": gate, "up": up, "neuron": neuron, "down": expert_linear(experts, expert, "down", neuron)}


class PackedChannelStore:
    """The cached channels of a model with attached packed layers (dynamo.packed.model.attach_packed)."""

    expert_outputs = staticmethod(packed_expert_outputs)

    def __init__(self, model, cache: ChannelCache):
        self.model, self.cache = model, cache
        self.modules = packed_modules(model)
        self.validate()
        self._check_indices()  # once: indices never change after packing, and the check reads them to the host

    def _values(self, key: Key) -> torch.Tensor:
        i, e, p = key
        return getattr(self.modules[i].channels, f"values_{p}")[e]

    def validate(self) -> None:
        """The packed layers keep channel rows for the cache's layers (before every switch: no device reads)."""
        if sorted(self.modules) != self.cache.layers:
            raise UserError(f"the channel cache covers MoE layers {self.cache.layers}, the packed model has "
                            f"{sorted(self.modules)}")
        for i, module in self.modules.items():
            if module.channels is None:
                raise UserError(f"packed layer {i} keeps no channel rows: pack it with the cache "
                                f"(pack_experts(model, codes, cache))")

    def _check_indices(self) -> None:
        """The packed layers' rows are exactly the cache's channels (same experts and row indices)."""
        for i, module in self.modules.items():
            for p in PROJECTIONS:
                name, _ = SLICES[self.cache.unit][p]
                kept = getattr(module.channels, f"index_{p}")
                if not torch.equal(kept.cpu(), self.cache.index[i][name].long()):
                    raise UserError(f"packed layer {i} {p}: its channel rows are not this cache's channels")

    def read(self, key: Key) -> torch.Tensor:
        return self._values(key).clone()

    @torch.no_grad()
    def write(self, key: Key, values: torch.Tensor) -> None:
        target = self._values(key)
        target.copy_(values.to(device=target.device, dtype=target.dtype))

    def device(self, key: Key) -> torch.device:
        return self._values(key).device

    def element_size(self) -> int:
        return self._values((next(iter(self.modules)), 0, "gate")).element_size()
