"""An ablation as a plugin: one metric and one allocation rule with a setting of its own (docs/extending.md).

    python run.py plugins=[experiments/ablation.py] quant=example_greedy analysis.channel_metric=act_l2_plain
"""

from dataclasses import dataclass

import torch

from dynamo.quant.budget import check_target, layer_budget
from dynamo.registry import register_allocation, register_metric


@register_metric("act_l2_plain", statistic="sq")
def act_l2_plain(layer, stats, unit):
    """act_l2 without the router weight: sum over routed tokens of y_c^2. Does weighting by g_t matter?"""
    return stats.channels[unit]["sq"]


@dataclass
class GreedyParams:
    """greedy's own settings, set under quant.allocation.params (a misspelt one stops the run at start-up)."""

    max_bits: int = 8  # the widest width greedy raises an expert to: lower, and the layer's bits spread wider

    def __post_init__(self):
        if self.max_bits < 2:
            raise ValueError(f"max_bits must be at least 2, got {self.max_bits}")


@register_allocation("greedy", needs="significance", records=("target_bits",), check=check_target,
                     params=GreedyParams)
def greedy(layer, cfg):
    """budget's target without its solver: every expert at the lowest width, then the most significant
    experts raised to the highest width (up to layer.params.max_bits) the layer's bits still allow."""
    widths = sorted(int(w) for w in cfg.widths)
    bits = [widths[0]] * layer.n_experts
    left = layer_budget(layer.n_experts, cfg.target_bits) - sum(bits)
    for e in torch.argsort(layer.shares, descending=True, stable=True).tolist():
        raise_to = max([bits[e]] + [w for w in widths if w - bits[e] <= left and w <= layer.params.max_bits])
        left -= raise_to - bits[e]
        bits[e] = raise_to
    return bits
