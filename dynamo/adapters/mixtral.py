"""Mixtral: 8 fused experts, top-2 (the MoE block lives under `mlp` in transformers 5)."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="mixtral", storage="fused_3d", n_experts="num_local_experts"))
