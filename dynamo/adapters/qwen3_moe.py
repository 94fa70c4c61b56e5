"""Qwen3-MoE (Qwen3-30B-A3B): fused routed experts, no shared expert."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="qwen3_moe", storage="fused_3d", n_experts="num_experts"))
