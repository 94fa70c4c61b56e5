"""bitsandbytes baselines (NF4, LLM.int8 weights) applied to every expert, fake-quantized.

transformers' BitsAndBytesConfig only replaces nn.Linear modules, so it silently skips the
fused [E, 2I, H] expert tensors of transformers 5. Here every expert matrix (and shared
expert) goes through bitsandbytes' own functional quantizers and is replaced by its
dequantized value; the report counts the matrices, so a skipped expert cannot hide.
Storage: NF4 keeps one fp32 absmax per 64 weights (+0.5 bit); int8 one fp32 scale per row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import PROJECTIONS, moe_layers

NF4_BLOCK = 64


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
    return F.dequantize_4bit(packed, state).to(weight.dtype)


def _int8(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    codes, scales, _ = F.int8_vectorwise_quant(weight.half().contiguous())
    return F.int8_vectorwise_dequant(codes, scales).to(weight.dtype)


FORMATS = {"nf4": (_nf4, lambda rows, cols: 4 * rows * cols + 32 * -(-rows * cols // NF4_BLOCK)),
           "int8": (_int8, lambda rows, cols: 8 * rows * cols + 32 * rows)}


@torch.no_grad()
def apply_bnb(model: nn.Module, fmt: str) -> dict:
    """Quantize every routed and shared expert matrix in place; return matrices and bit accounting."""
    quantize, storage = FORMATS[fmt]
    matrices = routed_bits = routed_params = shared_bits = shared_params = 0
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            for projection in PROJECTIONS:
                w = layer.weight(e, projection)
                layer.set_weight(e, projection, quantize(w))
                routed_bits += storage(*w.shape)
                routed_params += w.numel()
                matrices += 1
        if layer.shared_expert is not None:
            for projection in PROJECTIONS:
                w = getattr(layer.shared_expert, f"{projection}_proj").weight.data
                w.copy_(quantize(w))
                shared_bits += storage(*w.shape)
                shared_params += w.numel()
                matrices += 1
    all_params = sum(p.numel() for p in model.parameters())
    other = all_params - routed_params - shared_params
    code_bits = 4 if fmt == "nf4" else 8
    return {"matrices": matrices,
            "bits": {"experts": routed_bits / routed_params, "experts_codes_only": float(code_bits),
                     "shared": shared_bits / shared_params if shared_params else None,
                     "all": (routed_bits + shared_bits + 16 * other) / all_params, "expert_params": routed_params,
                     "histogram": {str(code_bits): 1.0}}}
