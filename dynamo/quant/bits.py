"""Bit accounting: what a plan costs, counting group scales and zeros.

Reported over routed-expert weights (the number MoE quantization papers quote), over shared
experts, and over all weights of the model (everything not in the plan stays 16-bit).
`experts_codes_only` leaves the group parameters out, the convention behind the paper's
"3.00 bits" for GPTQ.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from ..adapters import PROJECTIONS, moe_layers
from .plan import SHARED, QuantPlan


def _shared_matrices(layer):
    shared = layer.shared_expert
    return [] if shared is None else [(p, getattr(shared, f"{p}_proj").weight) for p in PROJECTIONS]


def bit_accounting(model: nn.Module, plan: QuantPlan) -> dict:
    routed_bits = routed_code_bits = routed_params = 0
    shared_bits = shared_params = 0
    histogram: Counter = Counter()
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            for projection in PROJECTIONS:
                rows, cols = layer.weight(e, projection).shape
                spec = plan.spec_for(layer.index, e, projection)
                routed_bits += spec.storage_bits(rows, cols)
                routed_code_bits += spec.bits * rows * cols
                routed_params += rows * cols
                histogram[spec.bits] += rows * cols
        for projection, weight in _shared_matrices(layer):
            rows, cols = weight.shape
            shared_bits += plan.spec_for(layer.index, SHARED, projection).storage_bits(rows, cols)
            shared_params += rows * cols
    all_params = sum(p.numel() for p in model.parameters())
    other_params = all_params - routed_params - shared_params
    all_bits = routed_bits + shared_bits + 16 * other_params
    return {
        "experts": routed_bits / routed_params,
        "experts_codes_only": routed_code_bits / routed_params,
        "shared": shared_bits / shared_params if shared_params else None,
        "all": all_bits / all_params,
        "expert_params": routed_params,
        "histogram": {str(b): n / routed_params for b, n in sorted(histogram.items())},
    }
