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
    from transformers import AutoConfig

    values = dict(values)
    values.pop("architectures", None)
    model_type = values.pop("model_type")
    if layers is not None:
        values["num_hidden_layers"] = layers
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **values)


def build_model(name: str, layers: int | None = None, *, vocab_size: int | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> nn.Module:
    """`name`'s architecture with `layers` decoder layers (None: all), random weights.
    `vocab_size` shrinks the embedding (tests only; a dry run keeps the real one)."""
    values = load_real_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        if values["model_type"] in REMOTE_CODE:
            from .deepseek_standin import DeepseekStandIn

            model = DeepseekStandIn(values, layers=layers, vocab_size=vocab_size, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(hf_config(values, layers, vocab_size), dtype=dtype)
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
