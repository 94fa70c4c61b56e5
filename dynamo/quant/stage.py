"""The quantization stage of a run: a plan from the config, applied with RTN or GPTQ."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import moe_layers
from ..calibration import CalibrationStats, capture
from ..calibration.stage import all_calibration_windows
from ..config import Allocation, CalibConfig, ExportFormat, QuantConfig, QuantMethod
from ..errors import UserError
from ..tokens import RunTokens
from .allocation import allocate, allocate_dynamo
from .apply import GPTQOptions, QuantReport, apply_plan, quantize_sequential
from .bits import bit_accounting
from .bnb import FORMATS, apply_bnb
from .plan import QuantPlan
from .spec import QSpec

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    summary: dict                     # what the run record keeps under "quantization"
    plan: QuantPlan | None            # None for bitsandbytes (its formats are not plan widths)
    stats: CalibrationStats | None   # the calibration GPTQ used, for the coverage table
    codes: dict | None = None         # QuantReport.codes, with quant.export=packed (kernels/ packs them)


def plan_from_config(cfg: QuantConfig, model, model_name: str) -> QuantPlan:
    if cfg.plan:
        plan = QuantPlan.load(Path(cfg.plan).expanduser())
        if plan.method != cfg.method.value:
            raise UserError(f"{cfg.plan} is a {plan.method} plan but quant.method={cfg.method.value}")
        return plan
    try:
        default = QSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
        if cfg.shared_expert_bits is not None:
            QSpec(cfg.shared_expert_bits)
    except ValueError as err:
        raise UserError(f"quant: {err}") from None
    return QuantPlan(method=cfg.method.value, default=default, shared_default=cfg.shared_expert_bits,
                     model={"name": model_name, "model_type": getattr(model.config, "model_type", None),
                            "moe_layers": [layer.index for layer in moe_layers(model)]},
                     created_by={"allocation": "uniform", "quant": cfg.name})


DYNAMO_ALLOCATIONS = (Allocation.fcm, Allocation.budget)


def needs_analysis(cfg: QuantConfig) -> bool:
    """DynaMo's allocations need the per-dataset significance of the analysis stage."""
    return cfg.method in (QuantMethod.rtn, QuantMethod.gptq) and cfg.allocation.method in DYNAMO_ALLOCATIONS \
        and not cfg.plan


def quantize(model, tokens: RunTokens, known: list[str], cfg: QuantConfig, calib: CalibConfig,
             model_name: str, significance=None, errors: dict | None = None) -> QuantResult:
    """`significance` (dynamo.analysis.Significance) is required by the fcm and budget allocations;
    `errors` is the budget rule's per-layer error table when something (the DQS cache) measured it."""
    if cfg.method == QuantMethod.bnb:
        if cfg.bnb_format not in FORMATS:
            raise UserError(f"unknown quant.bnb_format '{cfg.bnb_format}'; choose one of {', '.join(FORMATS)}")
        summary = apply_bnb(model, cfg.bnb_format)
        return QuantResult({"method": "bnb", "format": cfg.bnb_format, **summary}, None, None)
    plan = plan_from_config(cfg, model, model_name)
    options = GPTQOptions(damp=cfg.damp, act_order=cfg.act_order)
    alloc = cfg.allocation
    needs_data = cfg.method == QuantMethod.gptq or alloc.method == Allocation.moeptq
    windows = all_calibration_windows(tokens, known, calib) if needs_data else None
    if alloc.method != Allocation.uniform and not cfg.plan:
        layers = list(moe_layers(model))
        if alloc.method in DYNAMO_ALLOCATIONS:
            if significance is None:
                raise UserError(f"quant.allocation.method={alloc.method.value} needs the analysis stage's significance")
            allocate_dynamo(plan, significance, layers, alloc, errors)
        else:
            if alloc.method == Allocation.moeptq:  # routing frequency from a statistics-light pass
                freq = capture(model, windows, batch_size=calib.batch_size, hessians=False)
                counts = {i: s.routed.tokens.cpu() for i, s in freq.layers.items()}
            else:
                counts = {layer.index: torch.zeros(layer.n_experts) for layer in layers}
            allocate(plan, counts, {layer.index for layer in layers if layer.shared_expert is not None},
                     alloc.method.value, alloc.target_bits, alloc.low_bits, alloc.high_bits, alloc.seed)
    keep = cfg.export == ExportFormat.packed
    if cfg.method == QuantMethod.rtn:
        report = apply_plan(model, plan, options=options, keep_codes=keep)
        return QuantResult(_summary(model, plan, report), plan, None, report.codes if keep else None)
    report, stats = quantize_sequential(model, plan, windows, batch_size=calib.batch_size,
                                        hessian_weighting=calib.hessian_weighting.value, min_tokens=calib.min_tokens,
                                        policy=calib.policy.value, options=options, keep_codes=keep)
    if report.rtn_fallback:
        log.warning("GPTQ: %d expert(s) quantized with RTN (no calibration signal or rtn_fallback): %s",
                    len(report.rtn_fallback), ", ".join(f"L{i}.E{e}" for i, e in report.rtn_fallback[:20]))
    return QuantResult(_summary(model, plan, report), plan, stats, report.codes if keep else None)


def _summary(model, plan: QuantPlan, report: QuantReport) -> dict:
    return {"method": plan.method, "allocation": plan.created_by.get("allocation", "uniform"),
            "matrices": report.matrices, "rtn_fallback": [list(x) for x in report.rtn_fallback],
            "gptq_loss": report.gptq_loss, "bits": bit_accounting(model, plan.spec_for)}

