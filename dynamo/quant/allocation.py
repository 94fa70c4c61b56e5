"""Expert bit allocations: the baselines (uniform, MoEPTQ-style frequency, random) and DynaMo's.

MoEPTQ ("Examining Post-Training Quantization for Mixture-of-Experts", arXiv 2406.08155)
gives the most-routed experts of each layer the high width and the rest the low width, with
the number of high-width experts set by the bit budget. We implement its *expert-frequency*
variant on top of GPTQ (the one DynaMo compares with), with two choices of ours, stated:
frequency is the routed-token count of our calibration pass (top-k selections, not
router-weighted), and attention stays 16-bit as everywhere in this harness (the original also
puts attention at 4 bits). Shared experts get the high width ("shared > routed").
`random` picks the same number of high-width experts per layer uniformly at random (seeded):
the control every allocation rule must beat.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..adapters import SHARED
from .budget import error_table, layer_budget, solve_budget
from .fcm import fcm_widths
from .fusion import fuse
from .plan import QuantPlan
from .spec import QSpec


def high_count(n_experts: int, target_bits: float, low: int, high: int) -> int:
    """Experts per layer at `high` bits so the layer's average code width is closest to target."""
    if not low <= target_bits <= high:
        raise UserError(f"quant.allocation.target_bits={target_bits} is outside [{low}, {high}] (low_bits, high_bits)")
    return int(round(n_experts * (target_bits - low) / (high - low)))


def allocate(plan: QuantPlan, token_counts: dict[int, torch.Tensor], shared_layers: set[int], rule: str,
             target_bits: float, low: int, high: int, seed: int = 0) -> QuantPlan:
    """Fill `plan` in place: per MoE layer, `high` bits for the chosen experts, `low` for the rest."""
    generator = torch.Generator().manual_seed(seed)
    for layer, counts in sorted(token_counts.items()):
        n = high_count(len(counts), target_bits, low, high)
        if rule == "moeptq":
            # stable order: ties go to the lower expert index, so the plan is deterministic
            order = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
        elif rule == "random":
            order = torch.randperm(len(counts), generator=generator).tolist()
        else:
            raise UserError(f"allocate handles moeptq and random, not '{rule}'")
        chosen = set(order[:n])
        for e in range(len(counts)):
            plan.set_expert_bits(layer, e, high if e in chosen else low)
        if layer in shared_layers:
            plan.set_expert_bits(layer, SHARED, high)
    plan.created_by.update(allocation=rule, target_bits=target_bits, low_bits=low, high_bits=high, seed=seed)
    return plan


def layer_widths(shares: torch.Tensor, cfg, errors: torch.Tensor | None, n_experts: int) -> list[int]:
    """One MoE layer's expert widths from its (fused) significance shares under the allocation rule
    of `cfg` (the quant.allocation node): `fcm` (paper Algorithm 1) or `budget` (exact, ours; needs
    `errors`, the layer's error_table over cfg.widths). Shared by BQ and by DQS's re-allocation."""
    widths = [int(w) for w in cfg.widths]
    if cfg.method.value == "fcm":
        bits, _ = fcm_widths(shares, widths, cfg.fcm.m, cfg.fcm.eps, cfg.fcm.max_iter, cfg.fcm.overlap_margin)
    else:
        costs = shares.double().numpy()[:, None] * errors.numpy()
        bits = solve_budget(costs, widths, layer_budget(n_experts, cfg.target_bits))
    return [int(b) for b in bits]


def allocate_dynamo(plan: QuantPlan, significance, layers: list, cfg,
                    errors: dict[int, torch.Tensor] | None = None) -> dict:
    """DynaMo's expert widths (spec Step 2) into `plan`, in place: per MoE layer, fuse the per-dataset
    expert significance (Eq. 2), then `fcm` or `budget` (layer_widths). `cfg` is the quant.allocation
    node; `errors` (layer -> error_table over cfg.widths) saves recomputing a table the channel cache
    already measured. Returns the fused significance, spread and widths per layer."""
    method, widths = cfg.method.value, list(cfg.widths)
    if method not in ("fcm", "budget"):
        raise UserError(f"allocate_dynamo handles fcm and budget, not '{method}'")
    try:
        specs = [QSpec(w, plan.default.group_size, plan.default.sym) for w in widths]
    except ValueError as err:
        raise UserError(f"quant.allocation.widths: {err}") from None
    if any(s.is_float for s in specs) or len(set(widths)) != len(widths):
        raise UserError(f"quant.allocation.widths={widths}: distinct integer widths only (16 is not a width)")
    if method == "fcm" and sorted(widths, reverse=True) != widths:
        raise UserError(f"fcm maps clusters ranked by centre to widths from high to low; "
                        f"list quant.allocation.widths descending, got {widths}")
    fused_by_layer = {}
    for layer in layers:
        fused, spread = fuse(significance.expert_matrix(layer.index), cfg.fuse.value)
        table = None
        if method == "budget":
            table = errors[layer.index] if errors and layer.index in errors else error_table(layer, specs)
        bits = layer_widths(fused, cfg, table, layer.n_experts)
        for e, b in enumerate(bits):
            plan.set_expert_bits(layer.index, e, b)
        fused_by_layer[layer.index] = {"fused": fused, "spread": spread, "bits": bits}
    plan.created_by.update(allocation=method, fuse=cfg.fuse.value, widths=widths, metric=significance.metric,
                           unit=significance.unit, datasets=significance.datasets,
                           **({"target_bits": cfg.target_bits} if method == "budget" else {}))
    return fused_by_layer
