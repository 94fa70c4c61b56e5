"""Random-weight models with the exact published config.json values (assets/configs/<model>.json),
truncated to their first layers.

The values are public facts, committed as JSON; nothing is downloaded. `layers=None` keeps the
full depth, which is only ever built on the meta device (for exact parameter counts).
DeepSeek-MoE-16B has no transformers class (remote code): it is built as the project's
ModuleList stand-in (dynamo/dryrun/deepseek_standin.py), the layout its adapter reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "assets" / "configs"
REAL_MODELS = ("olmoe", "qwen-moe", "deepseek-v2-lite", "qwen3-moe", "deepseek-moe", "mixtral")
REMOTE_CODE = {"deepseek"}  # model_types without a transformers class: the stand-in
# A path check at toy widths (scripts/dryrun.py --shrink, tests): every width down, the layout kept
# (dense prefix, shared experts, routing); a key a family's config lacks is left out.
SHRINK = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
          "n_routed_experts": 8, "num_experts": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
          "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
          "vocab_size": 8192}  # the embedded tokenizer's size


def load_real_config(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise UserError(f"no committed config for '{name}' (have: {', '.join(REAL_MODELS)}); "
                        f"add {path.relative_to(CONFIG_DIR.parents[1])}")
    values = json.loads(path.read_text())
    values.pop("_source", None)
    return values


def dense_prefix(values: dict) -> int:
    """Leading dense (non-MoE) layers: DeepSeek's first_k_dense_replace, else 0."""
    return int(values.get("first_k_dense_replace", 0) or 0)


def hf_config(values: dict, layers: int | None = None, vocab_size: int | None = None):
    """The model's config from the published values, truncated to `layers` (and `vocab_size`); the
    remote-code families get the stand-in's config class."""
    values = dict(values)
    values.pop("architectures", None)
    model_type = values.pop("model_type")
    if layers is not None:
        values["num_hidden_layers"] = layers
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    if model_type in REMOTE_CODE:
        from .deepseek_standin import DeepseekStandInConfig

        return DeepseekStandInConfig(**values)
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


def shrink_overrides(values: dict) -> dict:
    """SHRINK's values for the keys `values` (a published config) has."""
    return {k: v for k, v in SHRINK.items() if k in values}


def build_model(name: str, layers: int | None = None, *, vocab_size: int | None = None,
                overrides: dict | None = None, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                seed: int = 0) -> nn.Module:
    """`name`'s architecture with `layers` decoder layers (None: all), random weights.
    `vocab_size` shrinks the embedding (tests only; a dry run keeps the real one); `overrides`
    replace published values (shrink_overrides: a toy-width path check, never a measurement)."""
    values = {**load_real_config(name), **(overrides or {})}
    torch.manual_seed(seed)
    config = hf_config(values, layers, vocab_size)
    with torch.device(device):
        if values["model_type"] in REMOTE_CODE:
            from .deepseek_standin import DeepseekStandInForCausalLM

            model = DeepseekStandInForCausalLM._from_config(config, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def moe_layer_indices(values: dict, layers: int) -> list[int]:
    """Which of the first `layers` decoder layers are MoE (every family here: all after the dense prefix,
    except Qwen's mlp_only_layers)."""
    only_dense = set(values.get("mlp_only_layers") or [])
    return [i for i in range(dense_prefix(values), layers) if i not in only_dense]


def param_bytes(model: nn.Module, bytes_per_param: int = 2) -> dict:
    """Parameter counts (and bytes at `bytes_per_param`) split into routed experts, the rest of each
    decoder layer, and everything outside the layers; works on the meta device."""
    from ..adapters import moe_layers

    total = sum(p.numel() for p in model.parameters())
    routed = 0
    for layer in moe_layers(model):
        routed += sum(p.numel() for p in layer.experts.parameters())
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return {"params": total, "routed_expert_params": routed, "layer_params": layers,
            "outside_layer_params": total - layers, "bytes": total * bytes_per_param}
