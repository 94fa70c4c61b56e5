"""Where a loaded model lives: one device, or sharded by a `device_map` over several.

A model loaded with `device_map` (accelerate) carries `hf_device_map` ({module: device}); moving it with
`model.to(device)` would gather every shard onto one device, and a peak-memory figure read off one device
would miss the others. These helpers read the placement instead of assuming one device.
"""

from __future__ import annotations

import torch


def _as_device(value) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def mapped_devices(model) -> list[torch.device]:
    """The devices a `device_map` placed the model on (sorted, distinct); [] for a model loaded without one."""
    placement = getattr(model, "hf_device_map", None) or {}
    found = {_as_device(v) for v in placement.values() if str(v) not in ("disk",)}
    return sorted(found, key=str)


def is_sharded(model) -> bool:
    """Placed by a device_map over more than one device (a `.to()` would gather it)."""
    return len(mapped_devices(model)) > 1


def peak_gpu_memory_bytes(model, device: torch.device) -> int:
    """Peak allocated CUDA memory over every GPU the model occupies (its device_map's, else `device`)."""
    gpus = [d for d in mapped_devices(model) if d.type == "cuda"] or [device]
    indices = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in gpus})
    return sum(int(torch.cuda.max_memory_allocated(torch.device("cuda", i))) for i in indices)
