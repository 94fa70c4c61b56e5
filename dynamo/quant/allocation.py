"""Expert bit allocations: `allocate` runs the rule `quant.allocation.method` names (dynamo.registry.
ALLOCATIONS) on every MoE layer, and the baseline rules register here (uniform, moeptq, random);
DynaMo's register beside their solvers (fcm in fcm.py, budget in budget.py).

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

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..adapters import SHARED
from ..errors import UserError
from ..registry import ALLOCATIONS, AllocationRule, register_allocation
from .budget import error_table
from .fusion import fuse
from .plan import QuantPlan
from .spec import QSpec


@dataclass
class LayerInput:
    """What a rule sees of one MoE layer; the fields its registration `needs` are filled, the rest None."""
    index: int
    n_experts: int
    shares: torch.Tensor | None = None        # needs="significance": fused expert significance [E] (Eq. 2), sums to 1
    counts: torch.Tensor | None = None        # needs="routing": routed tokens per expert [E]
    errors: torch.Tensor | None = None        # error_table=True: relative RTN error [E, len(cfg.widths)], float64
    generator: torch.Generator | None = None  # seeded from cfg.seed once per allocation, layers in index order
    params: Any = None                        # the rule's own settings: its `params` dataclass, from cfg.params


def rule_of(cfg) -> AllocationRule:
    """The registered rule of a quant.allocation node (one UserError for an unknown name)."""
    return ALLOCATIONS.get(cfg.method)


def _check_widths(plan: QuantPlan, cfg) -> list[QSpec]:
    """Significance rules choose among cfg.widths: distinct integer widths on the plan's grid."""
    widths = [int(w) for w in cfg.widths]
    try:
        specs = [QSpec(w, plan.default.group_size, plan.default.sym) for w in widths]
    except ValueError as err:
        raise UserError(f"quant.allocation.widths: {err}") from None
    if any(s.is_float for s in specs) or len(set(widths)) != len(widths):
        raise UserError(f"quant.allocation.widths={widths}: distinct integer widths only (16 is not a width)")
    return specs


def offered_widths(cfg) -> set[int]:
    """The widths the rule of `cfg` (quant.allocation) can give a routed expert; empty: quant.bits."""
    rule = rule_of(cfg)
    return {int(w) for w in (rule.offers(cfg) if rule.offers is not None else cfg.widths)}


def layer_widths(rule: AllocationRule, layer: LayerInput, cfg) -> list[int] | None:
    """One layer's widths from `rule`, checked: one integer per routed expert (None: the plan's width)."""
    bits = rule.fn(layer, cfg)
    if bits is None:
        return None
    bits = [int(b) for b in bits]
    if len(bits) != layer.n_experts:
        raise UserError(f"allocation rule '{rule.name}' gave layer {layer.index} {len(bits)} widths "
                        f"for {layer.n_experts} experts")
    return bits


def allocate(plan: QuantPlan, layers: list, cfg, significance=None, counts: dict[int, torch.Tensor] | None = None,
             errors: dict[int, torch.Tensor] | None = None) -> dict:
    """Fill `plan` in place with the widths of the rule `cfg.method` (cfg: the quant.allocation node).
    `layers`: the MoE layers (index, n_experts, shared_expert); `significance` (dynamo.analysis) for
    rules that need it, `counts` (layer -> routed tokens [E]) for rules that need routing, `errors`
    (layer -> error table over cfg.widths) where something (the DQS cache) measured it already.
    Returns, for significance rules, the fused significance, spread and widths per layer."""
    rule = rule_of(cfg)
    specs = _check_widths(plan, cfg) if rule.needs == "significance" or rule.error_table else None
    if rule.check is not None:
        rule.check(cfg)
    if rule.needs == "significance" and significance is None:
        raise UserError(f"quant.allocation.method={rule.name} needs the analysis stage's significance")
    if rule.needs == "routing" and counts is None:
        raise UserError(f"quant.allocation.method={rule.name} needs the routed-token counts of a calibration pass")
    params = ALLOCATIONS.params_of(cfg)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    out = {}
    for layer in sorted(layers, key=lambda layer: layer.index):
        given = LayerInput(layer.index, layer.n_experts, generator=generator, params=params)
        if rule.needs == "routing":
            given.counts = counts[layer.index]
        if rule.needs == "significance":
            fused, spread = fuse(significance.expert_matrix(layer.index), cfg.fuse.value)
            given.shares = fused
        if rule.error_table:
            given.errors = errors[layer.index] if errors and layer.index in errors else error_table(layer, specs)
        bits = layer_widths(rule, given, cfg)
        if bits is None:
            continue
        for e, b in enumerate(bits):
            plan.set_expert_bits(layer.index, e, b)
        if rule.shared_high and layer.shared_expert is not None:
            plan.set_expert_bits(layer.index, SHARED, cfg.high_bits)
        if rule.needs == "significance":
            out[layer.index] = {"fused": given.shares, "spread": spread, "bits": bits}
    provenance = {"allocation": rule.name}
    if params is not None:  # the rule's own settings as it used them, defaults filled in
        provenance["params"] = asdict(params)
    if rule.needs == "significance":
        provenance.update(fuse=cfg.fuse.value, widths=[int(w) for w in cfg.widths], metric=significance.metric,
                          unit=significance.unit, datasets=significance.datasets)
    plan.created_by.update(provenance, **{key: getattr(cfg, key) for key in rule.records})
    return out


# --- the baselines -------------------------------------------------------------------------------

BASELINE_RECORDS = ("target_bits", "low_bits", "high_bits", "seed")


def high_count(n_experts: int, target_bits: float, low: int, high: int) -> int:
    """Experts per layer at `high` bits so the layer's average code width is closest to target."""
    if not low <= target_bits <= high:
        raise UserError(f"quant.allocation.target_bits={target_bits} is outside [{low}, {high}] (low_bits, high_bits)")
    return int(round(n_experts * (target_bits - low) / (high - low)))


def check_target(cfg) -> None:
    if not cfg.low_bits <= cfg.target_bits <= cfg.high_bits:
        raise UserError(f"quant.allocation.target_bits={cfg.target_bits} is outside [{cfg.low_bits}, {cfg.high_bits}] "
                        "(quant.allocation.low_bits, high_bits)")


def _high_first(order: list[int], layer: LayerInput, cfg) -> list[int]:
    """The first high_count experts of `order` at cfg.high_bits, the rest at cfg.low_bits."""
    chosen = set(order[:high_count(layer.n_experts, cfg.target_bits, cfg.low_bits, cfg.high_bits)])
    return [cfg.high_bits if e in chosen else cfg.low_bits for e in range(layer.n_experts)]


@register_allocation("uniform", offers=lambda cfg: ())
def uniform(layer: LayerInput, cfg) -> None:
    """Every routed expert at quant.bits: the plan as built."""
    return None


@register_allocation("moeptq", needs="routing", shared_high=True, records=BASELINE_RECORDS, check=check_target,
                     offers=lambda cfg: (cfg.low_bits, cfg.high_bits))
def moeptq(layer: LayerInput, cfg) -> list[int]:
    counts = layer.counts
    # stable order: ties go to the lower expert index, so the plan is deterministic
    return _high_first(sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e)), layer, cfg)


@register_allocation("random", shared_high=True, records=BASELINE_RECORDS, check=check_target,
                     offers=lambda cfg: (cfg.low_bits, cfg.high_bits))
def random(layer: LayerInput, cfg) -> list[int]:
    return _high_first(torch.randperm(layer.n_experts, generator=layer.generator).tolist(), layer, cfg)
