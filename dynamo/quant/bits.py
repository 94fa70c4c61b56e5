"""Bit accounting: what a quantization costs, counting group scales and zeros.

Reported over routed-expert weights (the number MoE quantization papers quote), over shared
experts, and over all weights of the model (everything not quantized stays 16-bit).
`experts_codes_only` leaves the group parameters out, the convention behind the paper's
"3.00 bits" for GPTQ.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Protocol

from torch import nn

from ..adapters import SHARED, moe_layers


class StorageFormat(Protocol):
    """What the accounting needs of a format: its code width and its storage of a matrix (QSpec has both)."""

    bits: int

    def storage_bits(self, rows: int, cols: int) -> int: ...


def bit_accounting(model: nn.Module, format_for: Callable[[int, int | str, str], StorageFormat]) -> dict:
    """format_for(layer, expert or "shared", projection) -> the format that matrix is stored in."""
    routed_bits = routed_code_bits = routed_params = 0
    shared_bits = shared_params = 0
    histogram: Counter = Counter()
    for layer in moe_layers(model):
        for expert, projection, weight in layer.matrices():
            rows, cols = weight.shape
            fmt = format_for(layer.index, expert, projection)
            if expert == SHARED:
                shared_bits += fmt.storage_bits(rows, cols)
                shared_params += rows * cols
            else:
                routed_bits += fmt.storage_bits(rows, cols)
                routed_code_bits += fmt.bits * rows * cols
                routed_params += rows * cols
                histogram[fmt.bits] += rows * cols
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
