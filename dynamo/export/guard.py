"""A packed checkpoint that transformers cannot load silently wrong without this project.

A packed checkpoint's experts are packed codes that only `dynamo.packed.hf_quantizer` understands. Saved
as a plain OLMoE/Qwen config, `AutoModelForCausalLM.from_pretrained` would warn "Unknown
quantization type" and initialise the experts randomly. So the saved config.json names a model type
transformers does not know ("dynamo_packed") and an `auto_map` into a small module shipped beside
it (`remote_loader.py`, copied as dynamo_packed.py); the real model type and architectures are kept
under the "dynamo_packed" key:

- without trust_remote_code, every Auto class refuses with transformers' usual "contains custom
  code" message (the model type is unknown, so there is no local code to fall back on);
- with it, the shipped module imports this project (or raises an ImportError that says how to get
  it) and hands back the real config, so the model loads with its packed experts;
- this project's own loaders (`dynamo.packed.hf_quantizer.load_packed`, run.py model=local) read the JSON
  themselves and never enable remote code (`base_config`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_TYPE = "dynamo_packed"
# config.json[KEY]: {"base_model_type", "base_architectures", "format_version", "how_to_load"}. Not "model_type":
# transformers' concrete config classes would take a sub-dict with their model_type as the whole config.
KEY = "dynamo_packed"
MODULE = "dynamo_packed"  # the shipped module, <checkpoint>/dynamo_packed.py
GUARD_VERSION = 1
HOW_TO_LOAD = ("load it with the DynaMo harness on the Python path: dynamo.packed.hf_quantizer.load_packed(path), "
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


def base_config(config_dict: dict, **kwargs):
    """The real transformers config of a (guarded or plain) packed checkpoint, with the "dynamo" quantizer
    registered so that from_pretrained(path, config=<this>) loads the packed experts. kwargs go to
    `from_dict` (e.g. return_unused_kwargs)."""
    from transformers import CONFIG_MAPPING

    from ..packed import hf_quantizer  # noqa: F401  (registers quant_method "dynamo" with transformers)

    plain = unguarded_dict(config_dict)
    if plain.get("model_type") not in CONFIG_MAPPING:  # an edited or foreign config.json: one line, not a KeyError
        from ..errors import UserError

        raise UserError(f"this packed checkpoint names base model type '{plain.get('model_type')}', which this "
                        "transformers does not know; re-export it, or fix base_model_type in its config.json")
    return CONFIG_MAPPING[plain["model_type"]].from_dict(plain, **kwargs)


def read_config_dict(path: str | Path, **hub_kwargs) -> dict:
    """config.json of a local folder or hub repo as a dict, no class resolved (no remote code)."""
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(str(path), **hub_kwargs)
    return config_dict
