"""OLMoE (allenai/OLMoE-1B-7B, MoE-Girl): 64 fused experts, top-8, no shared expert."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="olmoe", storage="fused_3d", n_experts="num_experts"))
