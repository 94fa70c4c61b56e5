"""A harness-quantized matrix (`dynamo.quant.QuantizedWeight`) in the kernels' packed format."""

from __future__ import annotations

from dynamo_kernels.packing import PackedWeight

from ..quant.rtn import QuantizedWeight


def pack_weight(q: QuantizedWeight) -> PackedWeight:
    """Pack q's codes, scales and zeros (layout: dynamo_kernels/packing.py)."""
    if q.spec.is_float:
        raise ValueError("a 16-bit (unquantized) weight has no codes to pack; keep it as a dense tensor")
    return PackedWeight.pack(q.codes, q.scales, q.zeros, q.spec.bits, q.spec.group_size, q.g_idx)
