"""dynamo_kernels: packed low-bit MoE experts (bit-packing, fused dequantize + matmul in Triton).

Depends on torch, and on triton only when a Triton kernel is chosen (`dispatch`); it never imports
the DynaMo harness (`dynamo`), which imports it: the glue that packs a quantized model and attaches
the packed experts lives in `dynamo.packed`. Layout and kernels: README.md beside this file.

The import name is not `kernels`: that is a PyPI package (Hugging Face hub kernels) which
transformers and bitsandbytes probe for, and a folder of that name would shadow it.
"""

from .dispatch import dequant_matmul, expert_linear, moe_experts
from .experts import PackedExperts, Routing, WeightStack
from .packing import PackedWeight, column_groups, pack_codes, unpack_codes
from .projections import PROJECTIONS, STAGES
from .reference import dequant_matmul_ref, moe_experts_ref

__all__ = ["PROJECTIONS", "STAGES", "PackedExperts", "PackedWeight", "Routing", "WeightStack", "column_groups",
           "dequant_matmul", "dequant_matmul_ref", "expert_linear", "moe_experts", "moe_experts_ref", "pack_codes",
           "unpack_codes"]
