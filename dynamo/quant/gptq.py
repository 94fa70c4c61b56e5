"""GPTQ (Frantar et al., 2022) for one weight matrix, on the shared RTN grid (rtn.py).

Follows the reference algorithm (IST-DASLab/gptq): fp32, damping 1% of the mean Hessian
diagonal, lazy block updates of 128 columns, optional act-order with static groups. Two
deliberate differences, both for the cross-dataset setting DynaMo is about: columns that no
calibration token activated (H_jj = 0) keep their weights (quantized, not zeroed), and group
parameters are fitted on the current, error-compensated weights even when a group starts
inside a block.
"""

from __future__ import annotations

import logging

import torch

from dynamo_kernels.packing import column_groups

from .rtn import QuantizedWeight, fit_params, quantize_codes, quantize_rtn
from .spec import QSpec

log = logging.getLogger(__name__)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of H^-1, raising the damping until H is positive definite."""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(5):
        try:
            lower = torch.linalg.cholesky(h + damp * (10 ** attempt) * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    return None


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QSpec, *, damp: float = 0.01,
                  act_order: bool = False, blocksize: int = 128) -> tuple[QuantizedWeight, float]:
    """weight [rows, cols], hessian [cols, cols] (sum of x x^T) -> codes and the GPTQ loss."""
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)
    if not torch.isfinite(h).all() or torch.diag(h).max() <= 0:
        return quantize_rtn(weight, spec), float("nan")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # never-activated input columns: no error feedback through them

    group = cols if spec.group_size == -1 else spec.group_size
    groups = column_groups(cols, spec.group_size, w.device)
    n_groups = int(groups.max()) + 1
    scales = torch.zeros(rows, n_groups, device=w.device)
    zeros = torch.zeros(rows, n_groups, device=w.device)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    if act_order:  # static groups: fit every group on the original weights, before any update
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = fit_params(w[:, g * group:(g + 1) * group], spec)
        w, h = w[:, perm], h[perm][:, perm]

    u = _inverse_cholesky(h, damp)
    if u is None:
        log.warning("GPTQ: Hessian not positive definite even with 10^4 x damping; using RTN")
        return quantize_rtn(weight, spec), float("nan")

    codes = torch.zeros(rows, cols, device=w.device)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(groups[perm[col]])
            if not act_order and col % group == 0:
                current = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scales[:, g], zeros[:, g] = fit_params(current, spec)
            q = quantize_codes(w1[:, i:i + 1], scales[:, g], zeros[:, g], spec.bits)[:, 0]
            codes[:, col] = q
            dq = scales[:, g] * (q - zeros[:, g])
            d = u1[i, i]
            err = (w1[:, i] - dq) / d
            loss += float(err.square().sum() / 2)  # (w - q)^2 / U_ii^2 / 2, the reference's loss
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, spec=spec), loss
