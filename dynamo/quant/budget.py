"""DynaMo under an exact bit budget (our addition, spec Step 2): per MoE layer, the widths
that minimise the expected output error while the layer's experts average `target_bits`.

Expected error of expert e at width b: its fused significance share S_e (how much of the
layer's output energy it carries) times the relative reconstruction error of its weights at b
bits, ||W - Q_b(W)||^2 / ||W||^2 over its projections, measured with RTN on the real weights.
The assignment is a multiple-choice knapsack; routed experts of a layer have equal sizes, so
an exact dynamic programme over integer bit totals solves it in O(experts x widths x budget).
Written here because it is small and exact; a MILP solver would add a dependency for nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError
from ..registry import register_allocation
from .rtn import quantize_rtn
from .spec import QSpec


def relative_error(weights: list[torch.Tensor], spec: QSpec) -> float:
    """sum ||W - Q(W)||^2 / sum ||W||^2 over an expert's matrices (RTN on `spec`'s grid)."""
    num = den = 0.0
    for w in weights:
        w = w.float()
        num += float((quantize_rtn(w, spec).dequantize() - w).square().sum())
        den += float(w.square().sum())
    return num / den if den > 0 else 0.0


def error_table(layer, specs: list[QSpec]) -> torch.Tensor:
    """[experts, len(specs)] float64: each routed expert's relative RTN error at each width."""
    return torch.tensor([[relative_error([layer.weight(e, p) for p in ("gate", "up", "down")], spec) for spec in specs]
                         for e in range(layer.n_experts)], dtype=torch.float64)


def solve_budget(costs: np.ndarray, widths: list[int], budget: int) -> list[int]:
    """costs [n, len(widths)] -> the width of each expert; sum of widths <= budget, least total cost.
    Exact. Ties go to the lexicographically first choice in expert order, so results are stable."""
    n, k = costs.shape
    if k != len(widths):
        raise ValueError(f"{k} cost columns for {len(widths)} widths")
    if budget < n * min(widths):
        raise UserError(f"a budget of {budget} bits cannot give {n} experts even {min(widths)} bits each; "
                        "raise quant.allocation.target_bits or add a lower width")
    inf = math.inf
    # best[i][b]: least cost of experts i.. with at most b bits left; choice[i][b]: the width index taken
    best = np.full((n + 1, budget + 1), inf)
    best[n, :] = 0.0
    choice = np.full((n, budget + 1), -1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        for j, w in enumerate(widths):
            if w > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[w:] = costs[i, j] + best[i + 1, :budget + 1 - w]
            better = cand < best[i]
            best[i][better] = cand[better]
            choice[i][better] = j
    if not np.isfinite(best[0, budget]):
        raise UserError(f"no assignment of widths {widths} fits {budget} bits for {n} experts")
    out, left = [], budget
    for i in range(n):
        j = int(choice[i, left])
        out.append(widths[j])
        left -= widths[j]
    return out


def layer_budget(n_experts: int, target_bits: float) -> int:
    """Integer bit total of a layer: the target average times the experts, never above it."""
    return int(math.floor(n_experts * target_bits + 1e-9))


def check_target(cfg) -> None:
    widths = [int(w) for w in cfg.widths]
    target = cfg.target_bits
    if not widths or not min(widths) <= target <= max(widths):
        raise UserError(f"quant.allocation.target_bits={target} is outside the widths offered "
                        f"(quant.allocation.widths={widths}); choose a target in [{min(widths or [0])}, "
                        f"{max(widths or [0])}] or add a width")


@register_allocation("budget", needs="significance", error_table=True, records=("target_bits",), check=check_target)
def budget_rule(layer, cfg) -> list[int]:
    """DynaMo, ours: the least expected error (share x relative RTN error) at exactly cfg.target_bits."""
    costs = layer.shares.double().numpy()[:, None] * layer.errors.numpy()
    return solve_budget(costs, [int(w) for w in cfg.widths], layer_budget(layer.n_experts, cfg.target_bits))
