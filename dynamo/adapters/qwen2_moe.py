"""Qwen1.5-MoE / Qwen2-MoE: fused routed experts plus one shared expert scaled by a sigmoid gate."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="qwen2_moe", storage="fused_3d", n_experts="num_experts",
                            shared="shared_expert", shared_gate="shared_expert_gate"))
