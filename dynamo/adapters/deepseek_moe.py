"""DeepSeek-MoE-16B (remote code, model_type "deepseek"): an nn.ModuleList of MLP experts,
`shared_experts`, a dense first layer. In eval mode its block routes through
`moe_infer(x, topk_idx, topk_weight)`, which is where custom expert compute is plugged in."""

from .base import MoEAdapter, register_adapter

register_adapter(MoEAdapter(model_type="deepseek", storage="module_list", n_experts="n_routed_experts",
                            shared="shared_experts", dispatch="moe_infer"))
