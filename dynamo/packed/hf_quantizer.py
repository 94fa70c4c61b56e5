"""Save and reload packed models with transformers: a "dynamo" quantization config and quantizer.

    attach_packed(model, packed)          # dynamo.packed.model
    model.save_pretrained(path)           # packed tensors + config.json["quantization_config"]
    model = load_packed(path)             # or AutoModelForCausalLM.from_pretrained after importing this module

The config stores each MoE layer's layout (per projection each expert's [bits, group_size],
the channel rows, the sizes). Before the weights load, the quantizer swaps every layer's dense
expert parameters for empty packed ones of exactly those shapes (`packed_module.skeleton`);
transformers' loader then fills them by name like any other parameter, and afterwards the
model's experts run through the "dynamo_packed" implementation. Nothing is executed from the
checkpoint: the tensors come from safetensors, the layout from JSON.

transformers only knows this method once this module is imported: its classes register
themselves with transformers' `register_quantization_config` / `register_quantizer` (once per
process, as a module is imported once); `load_packed` imports it for you.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dynamo_kernels.packed_module import skeleton

from ..adapters import moe_layers
from .model import install_packed, use_packed_implementation

METHOD = "dynamo"
FORMAT_VERSION = 1


@register_quantization_config(METHOD)
class DynamoPackedConfig(QuantizationConfigMixin):
    """Per MoE layer (by decoder-layer index, as a string key) the packed layout; see packed_module.layout_of."""

    def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = METHOD
        self.layers = dict(layers or {})
        self.format_version = int(format_version)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"packed format version {self.format_version} is not supported (this code reads "
                             f"version {FORMAT_VERSION}); re-export the model with this version of the library")


@register_quantizer(METHOD)
class DynamoPackedQuantizer(HfQuantizer):
    """Loads models packed by `attach_packed`; it cannot quantize a float checkpoint (run DynaMo for that)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        layouts = self.quantization_config.layers
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        layers = list(moe_layers(model))
        missing = sorted({str(layer.index) for layer in layers} - set(layouts))
        if missing:
            raise ValueError(f"the dynamo quantization config has no layout for MoE layer(s) {', '.join(missing)}")
        for layer in layers:
            install_packed(layer, skeleton(layouts[str(layer.index)], layer.activation(), dtype))

    def _process_model_after_weight_loading(self, model, **kwargs):
        use_packed_implementation(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def load_packed(path: str | Path, *args, **kwargs):
    """AutoModelForCausalLM.from_pretrained for a saved packed model (kwargs pass through, e.g. dtype).

    Reads checkpoints written by `dynamo.export` (config.json behind `dynamo.export.guard`) and plain
    `save_pretrained` ones alike, without remote code."""
    from transformers import AutoModelForCausalLM

    from ..export.guard import base_config, read_config_dict

    if "config" not in kwargs:
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        kwargs["config"] = base_config(read_config_dict(path, **hub))
    return AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)

