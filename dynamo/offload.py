"""model.offload=true: decoder layers live in CPU memory and visit the execution device one at a time.

Everything outside the decoder layers (embeddings, final norm, LM head, rotary tables) is moved to
the execution device once. A forward pre-hook on each decoder layer brings it there and a forward
hook sends it back, so a forward pass (evaluation, analysis, calibration capture) holds one layer's
weights on the GPU at a time. The sequential GPTQ path keeps a layer resident for its whole
capture -> quantize -> re-run step (`resident`). Stages that work on expert weights outside a
forward (the DQS cache and switches, the export) work where the weights are: on the CPU.

Why our own loop rather than accelerate's `cpu_offload`/`dispatch_model`: accelerate's offload
hooks replace an offloaded module's parameters by meta tensors between forwards (the values live
in a separate weights map), and this pipeline reads and rewrites expert weights between forwards
(GPTQ writes each layer, DQS switches write channels, the export reads everything).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters.base import adapter_for, get_path

HOME = torch.device("cpu")


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class LayerOffload:
    """The offload state of one model: where its layers execute, and what was measured on the way."""

    device: torch.device
    blocks: list[nn.Module]
    outside_bytes: int = 0            # everything but the decoder layers: always on `device`
    peak_resident_bytes: int = 0      # the most decoder-layer bytes on `device` at once
    transfers: int = 0                # layers brought to `device`
    _resident: set[int] = field(default_factory=set)
    _pinned: set[int] = field(default_factory=set)

    def bring(self, block: nn.Module) -> None:
        if id(block) in self._resident:
            return
        block.to(self.device)
        self._resident.add(id(block))
        self.transfers += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes,
                                       sum(_nbytes(b) for b in self.blocks if id(b) in self._resident))

    def send_back(self, block: nn.Module) -> None:
        if id(block) in self._pinned or id(block) not in self._resident:
            return
        block.to(HOME)
        self._resident.discard(id(block))

    @contextmanager
    def resident(self, block: nn.Module):
        """`block` stays on the execution device for the body (its forwards do not move it)."""
        self.bring(block)
        self._pinned.add(id(block))
        try:
            yield
        finally:
            self._pinned.discard(id(block))
            self.send_back(block)

    def decoder_bytes(self) -> int:
        """All decoder layers' bytes: what stays in CPU memory."""
        return sum(_nbytes(b) for b in self.blocks)

    def report(self) -> dict:
        return {"device": str(self.device), "outside_layers_bytes": self.outside_bytes,
                "peak_resident_layer_bytes": self.peak_resident_bytes, "layer_transfers": self.transfers}


def offload_layers(model: nn.Module, device: torch.device) -> LayerOffload:
    """Keep `model`'s decoder layers on the CPU and run each on `device` only while it is needed.
    The model must be on the CPU (loaded without a device_map)."""
    prefix = adapter_for(model).layers
    decoder = get_path(model, prefix)
    state = LayerOffload(device=torch.device(device), blocks=list(decoder))
    seen = set()  # tied weights (embeddings = LM head) are one Parameter: moved and counted once
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            param.data = param.data.to(state.device)   # .data: the Parameter object stays the one modules hold
            state.outside_bytes += param.numel() * param.element_size()
        for key, buf in module.named_buffers(recurse=False):
            module._buffers[key] = buf.to(state.device)
    for block in decoder:
        block.to(HOME)
        block.register_forward_pre_hook(lambda m, args: state.bring(m))
        block.register_forward_hook(lambda m, args, out: state.send_back(m))
    model._dynamo_offload = state
    return state


def offload_of(model: nn.Module) -> LayerOffload | None:
    return getattr(model, "_dynamo_offload", None)


def resident(model: nn.Module, block: nn.Module):
    """Context: `block` on the execution device for the body; nothing to do without offload."""
    state = offload_of(model)
    return state.resident(block) if state is not None else nullcontext()


def statistics_device(model: nn.Module, router: nn.Module) -> torch.device:
    """Where a layer's calibration statistics accumulate: where its forward runs (the execution device
    under offload, else the router's device, which differs per layer under a multi-GPU device_map)."""
    state = offload_of(model)
    return state.device if state is not None else router.weight.device
