"""The packed checkpoint format: its quantization config, its loader, and the guard on its config.json.

    attach_packed(model, packed)          # dynamo.packed.model
    model.save_pretrained(path)           # packed tensors + config.json["quantization_config"]
    guard_checkpoint(path)                # dynamo.export.packed does this: see "The guard" below
    model = load_packed(path)             # or AutoModelForCausalLM.from_pretrained after importing this module

The quantization config ("dynamo") stores each MoE layer's layout (per projection each expert's
[bits, group_size], the channel rows, the sizes). Before the weights load, the quantizer swaps every
layer's dense expert parameters for empty packed ones of exactly those shapes
(`packed_module.skeleton`); transformers' loader then fills them by name like any other parameter,
and afterwards the model's experts run through the "dynamo_packed" implementation. Nothing is
executed from the checkpoint: the tensors come from safetensors, the layout from JSON. transformers
only knows this method once this module is imported (`register_quantization_config` /
`register_quantizer` run once per process); `load_packed` and `base_config` import it for you.

The guard. Saved as a plain OLMoE/Qwen config, `AutoModelForCausalLM.from_pretrained` would warn
"Unknown quantization type" and initialise the experts randomly. So the saved config.json names a
model type transformers does not know ("dynamo_packed") and an `auto_map` into a small module
shipped beside it (`remote_loader.py`, copied as dynamo_packed.py); the real model type and
architectures are kept under the "dynamo_packed" key:

- without trust_remote_code, every Auto class refuses with transformers' usual "contains custom
  code" message (the model type is unknown, so there is no local code to fall back on);
- with it, the shipped module imports this project (or raises an ImportError that says how to get
  it) and hands back the real config, so the model loads with its packed experts;
- this project's own loaders (`load_packed`, run.py model=local) read the JSON themselves and never
  enable remote code (`base_config`).

Old import paths, kept because checkpoints already exported ship a dynamo_packed.py that imports
them: `dynamo.packed.hf_quantizer` (load_packed) and `dynamo.export.guard` (base_config).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dynamo_kernels.packed_module import skeleton

from ..adapters import moe_layers
from ..errors import UserError
from .attached import install_packed, use_packed_implementation

# --- the quantization config and quantizer --------------------------------------------------------

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


# --- the guard on config.json --------------------------------------------------------------------

MODEL_TYPE = "dynamo_packed"
# config.json[KEY]: {"base_model_type", "base_architectures", "format_version", "how_to_load"}. Not "model_type":
# transformers' concrete config classes would take a sub-dict with their model_type as the whole config.
KEY = "dynamo_packed"
MODULE = "dynamo_packed"  # the shipped module, <checkpoint>/dynamo_packed.py
GUARD_VERSION = 1
HOW_TO_LOAD = ("load it with the DynaMo harness on the Python path: dynamo.packed.format.load_packed(path), "
               "or python run.py model=local model.path=<checkpoint> quant=fp16; for a checkpoint any tool loads, "
               "export with quant.export=dequantized")
AUTO_MAP = {"AutoConfig": f"{MODULE}.DynamoPackedConfig", "AutoModelForCausalLM": f"{MODULE}.DynamoPackedForCausalLM"}


def is_guarded(config_dict: dict) -> bool:
    return config_dict.get("model_type") == MODEL_TYPE


def guard_checkpoint(path: Path) -> None:
    """Rewrite a packed checkpoint's config.json (just written by save_pretrained) behind the guard."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if is_guarded(config):
        return
    config[KEY] = {"base_model_type": config["model_type"], "base_architectures": config.get("architectures"),
                   "format_version": GUARD_VERSION, "how_to_load": HOW_TO_LOAD}
    config["model_type"] = MODEL_TYPE
    config["architectures"] = ["DynamoPackedForCausalLM"]
    config["auto_map"] = dict(AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(__file__).with_name("remote_loader.py"), path / f"{MODULE}.py")


def unguarded_dict(config_dict: dict) -> dict:
    """The config as transformers wrote it before `guard_checkpoint` (a copy)."""
    out = dict(config_dict)
    if not is_guarded(out):
        return out
    saved = out.pop(KEY, None)
    if not isinstance(saved, dict) or saved.get("format_version") != GUARD_VERSION:
        raise ValueError(f"this packed DynaMo checkpoint's config.json has no readable '{KEY}' entry "
                         f"(version {GUARD_VERSION}); re-export it with this version of the harness")
    out["model_type"] = saved["base_model_type"]
    if saved.get("base_architectures") is not None:
        out["architectures"] = saved["base_architectures"]
    out.pop("auto_map", None)
    return out


# --- loading ---------------------------------------------------------------------------------------

def base_config(config_dict: dict, **kwargs):
    """The real transformers config of a (guarded or plain) packed checkpoint; with this module imported,
    the "dynamo" quantizer is registered, so from_pretrained(path, config=<this>) loads the packed
    experts. kwargs go to `from_dict` (e.g. return_unused_kwargs)."""
    from transformers import CONFIG_MAPPING

    plain = unguarded_dict(config_dict)
    if plain.get("model_type") not in CONFIG_MAPPING:  # an edited or foreign config.json: one line, not a KeyError
        raise UserError(f"this packed checkpoint names base model type '{plain.get('model_type')}', which this "
                        "transformers does not know; re-export it, or fix base_model_type in its config.json")
    return CONFIG_MAPPING[plain["model_type"]].from_dict(plain, **kwargs)


def read_config_dict(path: str | Path, **hub_kwargs) -> dict:
    """config.json of a local folder or hub repo as a dict, no class resolved (no remote code)."""
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(str(path), **hub_kwargs)
    return config_dict


def load_packed(path: str | Path, *args, **kwargs):
    """AutoModelForCausalLM.from_pretrained for a saved packed model (kwargs pass through, e.g. dtype).

    Reads checkpoints written by `dynamo.export` (config.json behind the guard) and plain
    `save_pretrained` ones alike, without remote code."""
    from transformers import AutoModelForCausalLM

    if "config" not in kwargs:
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        kwargs["config"] = base_config(read_config_dict(path, **hub))
    return AutoModelForCausalLM.from_pretrained(path, *args, **kwargs)
