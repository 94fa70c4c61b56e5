"""apply_plan: quantize a model's experts in place, as a plan says (torchao's quantize_ shape).

The model ends up fake-quantized (each expert weight replaced by its dequantized value, what
evaluation needs); with keep_codes=True the integer codes, scales and zeros are returned too
(what the kernels pack). Attention, routers, embeddings and lm_head are left alone.
Each matrix goes to the per-matrix step the plan's method registered (dynamo.registry.QUANTIZERS,
`matrix`). A method registered with calibration=True (GPTQ) needs calibration statistics with
Hessians; an expert falls back to RTN when it has no calibration signal at all (a zero Hessian:
GPTQ would have nothing to work with) or when the calibration's `rtn_fallback` policy marked it;
the report lists every fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import SHARED, MoELayer, moe_layers
from ..calibration import CalibrationStats, LayerStats, capture_sequential
from ..errors import UserError
from ..offload import HOME, offload_of
from ..registry import QUANTIZERS
from .plan import QuantPlan
from .rtn import QuantizedWeight, quantize_rtn

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    matrices: int = 0
    rtn_fallback: list[tuple[int, int | str]] = field(default_factory=list)
    gptq_loss: float = 0.0
    codes: dict[tuple[int, int | str, str], QuantizedWeight] = field(default_factory=dict)


@dataclass
class GPTQOptions:
    damp: float = 0.01
    act_order: bool = False
    rtn_below_tokens: int = 0   # experts with fewer routed tokens use RTN (the rtn_fallback policy)
    params: Any = None          # the quantizer's own settings (quant.params as its registered dataclass)


def _expert_matrices(layer: MoELayer, stats: LayerStats | None):
    """(expert, projection, weight view, Hessian or None, routed tokens) for routed and shared experts."""
    for expert, projection, weight in layer.matrices():
        group, i = (None, 0) if stats is None else (stats.shared, 0) if expert == SHARED else (stats.routed, expert)
        if group is None:
            yield expert, projection, weight, None, 0
            continue
        hessians = group.hessian_in if projection != "down" else group.hessian_mid
        yield expert, projection, weight, None if hessians is None else hessians[i], int(group.tokens[i])


def quantize_layer(layer: MoELayer, plan: QuantPlan, stats: LayerStats | None, report: QuantReport,
                   options: GPTQOptions, forced_rtn: set, keep_codes: bool) -> None:
    quantizer = QUANTIZERS.get(plan.method)
    for expert, projection, weight, hessian, tokens in _expert_matrices(layer, stats):
        spec = plan.spec_for(layer.index, expert, projection)
        if spec.is_float:
            continue
        no_signal = quantizer.calibration and (
            hessian is None or not bool((torch.diag(hessian) > 0).any()) or tokens < options.rtn_below_tokens
            or (layer.index, expert) in forced_rtn)
        if no_signal:
            q, loss = quantize_rtn(weight, spec), float("nan")
        else:
            q, loss = quantizer.matrix(weight, hessian if quantizer.calibration else None, spec, options)
        if loss is not None and loss != loss:  # NaN: RTN instead (here, or the step fell back itself); count it
            if (layer.index, expert) not in report.rtn_fallback:
                report.rtn_fallback.append((layer.index, expert))
        elif loss is not None:
            report.gptq_loss += loss
        weight.copy_(q.dequantize().to(weight.dtype))
        report.matrices += 1
        if keep_codes:
            report.codes[(layer.index, expert, projection)] = q


def _check_plan(model: nn.Module, plan: QuantPlan) -> list[MoELayer]:
    layers = list(moe_layers(model))
    plan.validate_against({layer.index: layer.n_experts for layer in layers},
                          {layer.index for layer in layers if layer.shared_expert is not None})
    return layers


@torch.no_grad()
def apply_plan(model: nn.Module, plan: QuantPlan, stats: CalibrationStats | None = None, *,
               options: GPTQOptions | None = None, keep_codes: bool = False) -> QuantReport:
    """One shot: every MoE layer quantized with the statistics given (RTN needs none)."""
    options = options or GPTQOptions()
    if QUANTIZERS.get(plan.method).calibration and (stats is None or not stats.layers
                                                    or next(iter(stats.layers.values())).routed.hessian_in is None):
        raise UserError(f"quant.method={plan.method} needs calibration statistics with Hessians (calib.hessians=true)")
    report = QuantReport()
    forced = set(stats.rtn_fallback) if stats is not None else set()
    for layer in _check_plan(model, plan):
        quantize_layer(layer, plan, stats.layers.get(layer.index) if stats else None, report, options, forced,
                       keep_codes)
    return report


@torch.no_grad()
def quantize_sequential(model: nn.Module, plan: QuantPlan, windows: torch.Tensor, *, batch_size: int = 8,
                        hessian_weighting: str = "none", min_tokens: int = 16, policy: str = "warn",
                        options: GPTQOptions | None = None, keep_codes: bool = False
                        ) -> tuple[QuantReport, CalibrationStats]:
    """GPTQ's order: each layer is calibrated on the outputs of the already-quantized layers before it."""
    options = options or GPTQOptions()
    if policy == "rtn_fallback":  # the capture marks these experts; the quantizer applies the same rule
        options.rtn_below_tokens = max(options.rtn_below_tokens, min_tokens)
    layers = {layer.index: layer for layer in _check_plan(model, plan)}
    report = QuantReport()
    offloaded = offload_of(model) is not None

    def on_layer(index: int, layer_stats: LayerStats | None) -> bool:
        if index not in layers:
            return False
        quantize_layer(layers[index], plan, layer_stats, report, options, set(), keep_codes)
        if keep_codes and offloaded:  # every layer's codes would otherwise pile up on the GPU
            for key in [k for k in report.codes if k[0] == index]:
                report.codes[key] = report.codes[key].to(HOME)
        return True

    stats = capture_sequential(model, windows, on_layer, batch_size=batch_size, hessians=True,
                               hessian_weighting=hessian_weighting, min_tokens=min_tokens, policy=policy,
                               keep_hessians=False)  # each layer's are used by on_layer, then freed
    return report, stats
