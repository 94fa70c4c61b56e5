"""DeepSeek-V2 / V2-Lite: fused routed experts, ungated shared experts, dense first layers."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="deepseek_v2", storage="fused_3d", n_experts="n_routed_experts",
                            shared="shared_experts"))
