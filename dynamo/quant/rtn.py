"""Round-to-nearest group quantization: the grid every quantizer here shares.

Asymmetric: per (row, group) xmin = min(0, min w), xmax = max(0, max w),
s = (xmax - xmin) / (2^b - 1), z = round(-xmin / s), q = clamp(round(w / s) + z, 0, 2^b - 1).
Symmetric: s = max|w| / (2^(b-1) - 1), z = 2^(b-1). Dequantized: w_hat = s * (q - z).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dynamo_kernels.packing import column_groups

from .spec import QSpec


@dataclass
class QuantizedWeight:
    """Integer codes and group parameters of one [rows, cols] matrix (what the kernels pack)."""

    codes: torch.Tensor    # [rows, cols] uint8 in [0, 2^b - 1]
    scales: torch.Tensor   # [rows, groups] float32
    zeros: torch.Tensor    # [rows, groups] float32 (integer values)
    spec: QSpec
    g_idx: torch.Tensor | None = None  # [cols] group of each column when act-order permuted them

    def to(self, device: torch.device) -> QuantizedWeight:
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device),
                       g_idx=None if self.g_idx is None else self.g_idx.to(device))

    def dequantize(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        g_idx = self.g_idx if self.g_idx is not None else column_groups(cols, self.spec.group_size, self.codes.device)
        return self.scales[:, g_idx] * (self.codes.float() - self.zeros[:, g_idx])


def fit_params(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of w [rows, n] (one group)."""
    w = w.float()
    maxq = 2 ** spec.bits - 1
    if spec.sym:
        amax = w.abs().amax(dim=1)
        scale = amax / (2 ** (spec.bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
        return scale, zero
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w [rows, n], scale/zero [rows] -> codes [rows, n] (float, integer-valued)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)


def quantize_rtn(weight: torch.Tensor, spec: QSpec) -> QuantizedWeight:
    rows, cols = weight.shape
    w = weight.float()
    group = cols if spec.group_size == -1 else spec.group_size
    scales, zeros, codes = [], [], []
    for start in range(0, cols, group):
        block = w[:, start:start + group]
        scale, zero = fit_params(block, spec)
        scales.append(scale)
        zeros.append(zero)
        codes.append(quantize_codes(block, scale, zero, spec.bits))
    return QuantizedWeight(codes=torch.cat(codes, 1).to(torch.uint8), scales=torch.stack(scales, 1),
                           zeros=torch.stack(zeros, 1), spec=spec)
