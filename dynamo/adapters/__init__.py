"""MoE adapters: one short declaration per family, found by `config.model_type`.

Adding a family is adding one file here that calls `register_adapter(MoEAdapter(...))`:
every module of this package is imported on first use.
"""

import importlib
import pkgutil

from .base import (PROJECTIONS, SHARED, MoEAdapter, MoELayer, adapter_for, adapter_for_type, moe_layers,
                   register_adapter, registered_adapters)
from .compute import expert_compute

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "compute"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PROJECTIONS", "SHARED", "MoEAdapter", "MoELayer", "adapter_for", "adapter_for_type", "moe_layers",
           "register_adapter", "registered_adapters", "expert_compute"]
