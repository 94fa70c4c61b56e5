"""Expert bit allocations of the baselines: uniform, MoEPTQ-style frequency, and random.

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
from .plan import QuantPlan


def high_count(n_experts: int, target_bits: float, low: int, high: int) -> int:
    """Experts per layer at `high` bits so the layer's average code width is closest to target."""
    if not low <= target_bits <= high:
        raise UserError(f"quant.target_bits={target_bits} is outside [{low}, {high}] (low_bits, high_bits)")
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
            raise UserError(f"unknown quant.allocation '{rule}'; choose uniform, moeptq or random")
        chosen = set(order[:n])
        for e in range(len(counts)):
            plan.set_expert_bits(layer, e, high if e in chosen else low)
        if layer in shared_layers:
            plan.set_expert_bits(layer, SHARED, high)
    plan.created_by.update(allocation=rule, target_bits=target_bits, low_bits=low, high_bits=high, seed=seed)
    return plan
