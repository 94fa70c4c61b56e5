"""Paper Algorithm 1: fuzzy c-means over the experts' fused significance, one MoE layer at a time.

Bezdek's fuzzy c-means on one feature (an expert's significance share). The paper fixes the
clusters (4 -> INT8/6/4/2, ranked by centre) and the overlap rule (an expert between two
clusters takes the LOWER precision) but not the rest; ours (spec Step 2): fuzzifier m = 2,
tolerance 1e-5 on memberships, at most 300 iterations, and a deterministic start (centres at
evenly spaced quantiles of the data), so the same significance always gives the same plan.
"Overlap" = the two largest memberships differ by less than `overlap_margin`.
Written here rather than taken from scikit-fuzzy (whose cmeans gives the same result from the
same start; tests/quant/test_references.py checks it): the clustering runs on torch tensors inside
the plan stage, and the harness should not need scikit-fuzzy and its dependencies at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..registry import register_allocation


@dataclass
class FcmResult:
    centres: torch.Tensor      # [c], ascending
    memberships: torch.Tensor  # [n, c], rows sum to 1, columns in the order of `centres`
    iterations: int
    converged: bool


def _memberships(x: torch.Tensor, centres: torch.Tensor, m: float) -> torch.Tensor:
    d = (x[:, None] - centres[None, :]).abs()
    exact = d == 0
    # u_ik = 1 / sum_j (d_ik / d_ij)^(2 / (m - 1)); a point on a centre belongs to it alone
    ratio = (d[:, :, None] / d[:, None, :].clamp(min=torch.finfo(d.dtype).tiny)) ** (2.0 / (m - 1.0))
    u = 1.0 / ratio.sum(dim=2)
    on_centre = exact.any(dim=1)
    if on_centre.any():
        u[on_centre] = exact[on_centre].double() / exact[on_centre].sum(dim=1, keepdim=True)
    return u


def fuzzy_cmeans(x: torch.Tensor, clusters: int = 4, m: float = 2.0, eps: float = 1e-5,
                 max_iter: int = 300) -> FcmResult:
    """x [n] -> centres and memberships. Deterministic: no random start."""
    if m <= 1.0:
        raise ValueError(f"the fuzzifier m must be > 1, got {m}")
    if clusters < 1:
        raise ValueError(f"need at least one cluster, got {clusters}")
    x = x.double().flatten()
    centres = torch.quantile(x, (torch.arange(clusters, dtype=torch.double) + 0.5) / clusters)
    u = _memberships(x, centres, m)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        w = u ** m
        centres = (w * x[:, None]).sum(dim=0) / w.sum(dim=0).clamp(min=torch.finfo(w.dtype).tiny)
        new_u = _memberships(x, centres, m)
        delta = (new_u - u).abs().max()
        u = new_u
        if delta < eps:
            converged = True
            break
    order = torch.argsort(centres, stable=True)
    return FcmResult(centres=centres[order], memberships=u[:, order], iterations=it, converged=converged)


def fcm_widths(significance: torch.Tensor, widths: list[int], m: float = 2.0, eps: float = 1e-5,
               max_iter: int = 300, overlap_margin: float = 0.1) -> tuple[list[int], FcmResult]:
    """Per expert, the width of its cluster: clusters ranked by centre, the highest centre gets
    widths[0] (widths listed from high to low precision); overlaps go to the lower precision."""
    if sorted(widths, reverse=True) != list(widths):
        raise ValueError(f"fcm widths must be listed from high to low precision, got {widths}")
    result = fuzzy_cmeans(significance, len(widths), m, eps, max_iter)
    by_rank = list(reversed(widths))  # ascending centres -> ascending precision
    out = []
    for row in result.memberships:
        top2 = torch.topk(row, k=min(2, len(row)))
        best = int(top2.indices[0])
        if len(row) > 1 and float(top2.values[0] - top2.values[1]) < overlap_margin:
            best = min(best, int(top2.indices[1]))  # lower centre = lower precision
        out.append(by_rank[best])
    return out, result


def check_descending(cfg) -> None:
    widths = [int(w) for w in cfg.widths]
    if sorted(widths, reverse=True) != widths:
        raise UserError(f"fcm maps clusters ranked by centre to widths from high to low; "
                        f"list quant.allocation.widths descending, got {widths}")


@register_allocation("fcm", needs="significance", check=check_descending)
def fcm_rule(layer, cfg) -> list[int]:
    """DynaMo as the paper allocates (Algorithm 1): quant.allocation.fcm's parameters, cfg.widths high to low."""
    bits, _ = fcm_widths(layer.shares, [int(w) for w in cfg.widths], cfg.fcm.m, cfg.fcm.eps, cfg.fcm.max_iter,
                         cfg.fcm.overlap_margin)
    return bits
