"""bitsandbytes baselines (NF4, LLM.int8 weights) applied to every expert, fake-quantized.

transformers' BitsAndBytesConfig only replaces nn.Linear modules, so it silently skips the
fused [E, 2I, H] expert tensors of transformers 5. Here every expert matrix (and shared
expert) goes through bitsandbytes' own functional quantizers and is replaced by its
dequantized value; the report counts the matrices, so a skipped expert cannot hide.
Storage: NF4 keeps one fp32 absmax per 64 weights (+0.5 bit); int8 one fp32 scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..adapters import moe_layers
from .bits import bit_accounting

NF4_BLOCK = 64


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
    return F.dequantize_4bit(packed, state).to(weight.dtype)


def _int8(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    codes, scales, _ = F.int8_vectorwise_quant(weight.half().contiguous())
    return F.int8_vectorwise_dequant(codes, scales).to(weight.dtype)


@dataclass(frozen=True)
class BnbFormat:
    bits: int
    quantize: Callable[[torch.Tensor], torch.Tensor]
    scale_bits: Callable[[int, int], int]   # fp32 scales of a [rows, cols] matrix

    def storage_bits(self, rows: int, cols: int) -> int:
        return self.bits * rows * cols + self.scale_bits(rows, cols)


FORMATS = {"nf4": BnbFormat(4, _nf4, lambda rows, cols: 32 * -(-rows * cols // NF4_BLOCK)),
           "int8": BnbFormat(8, _int8, lambda rows, cols: 32 * rows)}


@torch.no_grad()
def apply_bnb(model: nn.Module, fmt: str) -> dict:
    """Quantize every routed and shared expert matrix in place; return matrices and bit accounting."""
    spec = FORMATS[fmt]
    matrices = 0
    for layer in moe_layers(model):
        for _, _, weight in layer.matrices():
            weight.copy_(spec.quantize(weight))
            matrices += 1
    return {"matrices": matrices, "bits": bit_accounting(model, lambda *_: spec)}
