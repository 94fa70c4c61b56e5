"""Real-shape dry runs: the paper's models with their published configs, random weights, few layers."""

from .build import REAL_MODELS, build_model, load_real_config, moe_layer_indices, param_bytes

__all__ = ["REAL_MODELS", "build_model", "load_real_config", "moe_layer_indices", "param_bytes"]
