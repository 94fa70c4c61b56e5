"""DeepSeek-V3 / R1 layout: fused routed experts, ungated shared experts, dense first layers."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="deepseek_v3", storage="fused_3d", n_experts="n_routed_experts",
                            shared="shared_experts"))
