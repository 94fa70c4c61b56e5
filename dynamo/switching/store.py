"""Where a switch reads and writes the cached channels: a model's dense weights, or a packed model's rows.

The switcher (switch.py) only needs, per (layer, expert, projection), the values the model holds
at the cached channels now (`read`, a copy) and a way to replace them (`write`, in place). A
fake-quantized model keeps them in its dense expert weights (`DenseChannelStore`); a packed
model keeps them in its full-precision channel rows (`dynamo.packed.switching`). A store also
says how to profile the model (`expert_outputs`, for `dynamo.calibration.capture`), because a
packed model has no dense expert weights to compute them from.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..adapters import moe_layers
from .cache import ChannelCache

Key = tuple[int, int, str]  # (layer, expert, projection)


class ChannelStore(Protocol):
    expert_outputs: Callable | None   # capture's per-expert outputs; None: from the dense weights

    def validate(self) -> None: ...                 # refuse a model the cache was not built for

    def read(self, key: Key) -> torch.Tensor: ...   # [k, length], a copy

    def write(self, key: Key, values: torch.Tensor) -> None: ...

    def device(self, key: Key) -> torch.device: ...

    def element_size(self) -> int: ...              # bytes per value the model stores


class DenseChannelStore:
    """The cached channels inside the model's dense (fake-quantized) expert weights."""

    expert_outputs = None

    def __init__(self, model, cache: ChannelCache):
        self.model, self.cache = model, cache
        self.layers = {layer.index: layer for layer in moe_layers(model)}

    def validate(self) -> None:
        self.cache.validate(self.model)

    def read(self, key: Key) -> torch.Tensor:
        i, e, p = key
        return self.cache.read(self.layers[i], e, p)

    def write(self, key: Key, values: torch.Tensor) -> None:
        i, e, p = key
        self.cache.write(self.layers[i], e, p, values)

    def device(self, key: Key) -> torch.device:
        i, e, p = key
        return self.layers[i].weight(e, p).device

    def element_size(self) -> int:
        return next(iter(self.layers.values())).weight(0, "gate").element_size()
