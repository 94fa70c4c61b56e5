"""The built-in channel-significance metrics (`analysis.channel_metric`), one function each.

A metric maps one dataset's routed capture of one MoE layer to S_ch [n_experts, channels] of one
unit (gate, up, down: output rows; neuron: an intermediate neuron). A metric that needs a running
sum the capture does not keep registers it with `register_statistic` and names it in
`register_metric(..., statistic=...)`: captures for that metric accumulate it (and the analysis
cache keys them apart); see docs/extending.md, "Write your own ablation".
"""

from __future__ import annotations

import torch

from ..adapters import MoELayer
from ..registry import register_metric


@register_metric("act_l2", statistic="wsq")
def act_l2(layer: MoELayer, stats, unit: str) -> torch.Tensor:
    """sum over routed tokens of g_t * y_c(t)^2 (g_t: the token's router weight for the expert)."""
    return stats.channels[unit]["wsq"]


@register_metric("act_abs", statistic="wabs")
def act_abs(layer: MoELayer, stats, unit: str) -> torch.Tensor:
    """sum over routed tokens of g_t * |y_c(t)|."""
    return stats.channels[unit]["wabs"]


@register_metric("wanda")
def wanda(layer: MoELayer, stats, unit: str) -> torch.Tensor:
    """sum_j |W_cj| * ||x_j|| for every expert (Wanda's score, summed over row c): [n_experts, channels]."""
    # statistics accumulate where the forward ran; the weights may be elsewhere (model.offload keeps them on the CPU)
    device = layer.weight(0, "gate").device
    norms_in = stats.channels["input"]["sq"].sqrt().to(device)     # [E, H]: ||x_j|| over routed tokens
    norms_mid = stats.channels["neuron"]["sq"].sqrt().to(device)   # [E, I]: ||h_j||, the down projection's input
    rows = []
    for e in range(layer.n_experts):
        weights = {p: layer.weight(e, p).abs().float() for p in ("gate", "up", "down")}
        if unit == "gate" or unit == "up":
            rows.append(weights[unit] @ norms_in[e].float())
        elif unit == "down":
            rows.append(weights["down"] @ norms_mid[e].float())
        else:  # neuron c: its gate and up rows read x, its down column is read through ||h_c||
            rows.append((weights["gate"] + weights["up"]) @ norms_in[e].float()
                        + weights["down"].sum(dim=0) * norms_mid[e].float())
    return torch.stack(rows)


@register_metric("freq")
def freq(layer: MoELayer, stats, unit: str) -> torch.Tensor:
    """The routed-token count, the same for every channel of an expert."""
    width = stats.channels[unit]["sq"].shape[1]
    return stats.tokens.double().cpu()[:, None].expand(-1, width).clone()
