"""Paper Eq. 2: one cross-dataset expert significance from the per-dataset ones.

The paper fits a joint distribution over the per-dataset significance vectors and keeps its
consensus; it does not name the fit. Ours, per MoE layer (spec Step 2): `mean` (default),
`max` (an expert matters if it matters anywhere), `geomean` (it must matter everywhere), and
`gaussian` (a diagonal Gaussian per expert: its mean allocates, its std is the expert's
cross-dataset dynamics). Every result is renormalised to sum to 1 over the layer's experts.
"""

from __future__ import annotations

import torch

FUSIONS = ("mean", "max", "geomean", "gaussian")
_FLOOR = 1e-12  # geomean of an expert no token reached in one dataset: tiny, not -inf


def fuse(shares: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """shares [datasets, experts] (rows sum to 1) -> (fused [experts] summing to 1, std over datasets)."""
    if shares.dim() != 2 or shares.shape[0] == 0:
        raise ValueError(f"fuse needs [datasets, experts] shares, got {tuple(shares.shape)}")
    x = shares.double()
    spread = x.std(dim=0, unbiased=False)
    if how in ("mean", "gaussian"):  # the Gaussian's maximum-likelihood mean is the sample mean
        fused = x.mean(dim=0)
    elif how == "max":
        fused = x.max(dim=0).values
    elif how == "geomean":
        fused = x.clamp(min=_FLOOR).log().mean(dim=0).exp()
    else:
        raise ValueError(f"unknown fusion '{how}'; choose one of {', '.join(FUSIONS)}")
    total = fused.sum()
    fused = fused / total if total > 0 else torch.full_like(fused, 1 / len(fused))
    return fused, spread
