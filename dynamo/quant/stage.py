"""The quantization stage of a run: a plan from the config, filled by the allocation rule, applied by the
quantizer `quant.method` names (registered here: none, rtn, gptq, bnb)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..adapters import moe_layers
from ..calibration import CalibrationStats, capture
from ..calibration.stage import all_calibration_windows
from ..config import CalibConfig, ExportFormat, QuantConfig
from ..errors import UserError
from ..registry import QUANTIZERS, Quantizer, register_quantizer
from ..tokens import RunTokens
from .allocation import allocate, rule_of
from .apply import GPTQOptions, QuantReport, apply_plan, quantize_sequential
from .bits import bit_accounting
from .bnb import FORMATS, apply_bnb
from .gptq import quantize_gptq
from .plan import QuantPlan
from .rtn import quantize_rtn
from .spec import QSpec

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    summary: dict                     # what the run record keeps under "quantization"
    plan: QuantPlan | None            # None for bitsandbytes (its formats are not plan widths)
    stats: CalibrationStats | None   # the calibration GPTQ used, for the coverage table
    codes: dict | None = None         # QuantReport.codes, with quant.export=packed (dynamo.packed packs them)


def plan_from_config(cfg: QuantConfig, model, model_name: str) -> QuantPlan:
    if cfg.plan:
        plan = QuantPlan.load(Path(cfg.plan).expanduser())
        if plan.method != cfg.method:
            raise UserError(f"{cfg.plan} is a {plan.method} plan but quant.method={cfg.method}")
        return plan
    try:
        default = QSpec(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
        if cfg.shared_expert_bits is not None:
            QSpec(cfg.shared_expert_bits)
    except ValueError as err:
        raise UserError(f"quant: {err}") from None
    return QuantPlan(method=cfg.method, default=default, shared_default=cfg.shared_expert_bits,
                     model={"name": model_name, "model_type": getattr(model.config, "model_type", None),
                            "moe_layers": [layer.index for layer in moe_layers(model)]},
                     created_by={"allocation": "uniform", "quant": cfg.name})


def needs_analysis(cfg: QuantConfig) -> bool:
    """Rules that need significance (DynaMo's) need the analysis stage, with a plan quantizer and no plan file."""
    return QUANTIZERS.get(cfg.method).plan and rule_of(cfg.allocation).needs == "significance" and not cfg.plan


# --- the quantizers (dynamo.registry.QUANTIZERS). A plan quantizer: fn(model, plan, windows, calib,
# options, keep_codes) -> (QuantReport, CalibrationStats | None); windows are the calibration windows
# when it is registered with calibration=True (else None). Any other: fn(model, cfg) -> summary dict.

QUANTIZERS.register("none", Quantizer("none", None), __name__)  # the 16-bit reference: nothing to quantize


def rtn_matrix(weight, hessian, spec, options: GPTQOptions):
    return quantize_rtn(weight, spec), None


def gptq_matrix(weight, hessian, spec, options: GPTQOptions):
    return quantize_gptq(weight, hessian, spec, damp=options.damp, act_order=options.act_order)


@register_quantizer("rtn", plan=True, matrix=rtn_matrix)
def rtn(model, plan, windows, calib: CalibConfig, options: GPTQOptions, keep_codes: bool):
    return apply_plan(model, plan, options=options, keep_codes=keep_codes), None


@register_quantizer("gptq", plan=True, calibration=True, matrix=gptq_matrix)
def gptq(model, plan, windows, calib: CalibConfig, options: GPTQOptions, keep_codes: bool):
    return quantize_sequential(model, plan, windows, batch_size=calib.batch_size,
                               hessian_weighting=calib.hessian_weighting.value, min_tokens=calib.min_tokens,
                               policy=calib.policy.value, options=options, keep_codes=keep_codes)


@register_quantizer("bnb")
def bnb(model, cfg: QuantConfig) -> dict:
    if cfg.bnb_format not in FORMATS:
        raise UserError(f"unknown quant.bnb_format '{cfg.bnb_format}'; choose one of {', '.join(FORMATS)}")
    return {"method": "bnb", "format": cfg.bnb_format, **apply_bnb(model, cfg.bnb_format)}


def quantize(model, tokens: RunTokens, known: list[str], cfg: QuantConfig, calib: CalibConfig,
             model_name: str, significance=None, errors: dict | None = None) -> QuantResult:
    """`significance` (dynamo.analysis.Significance) is required by rules that need it (fcm, budget);
    `errors` is an error-table rule's per-layer table when something (the DQS cache) measured it."""
    quantizer = QUANTIZERS.get(cfg.method)
    if quantizer.fn is None:
        raise UserError(f"quant.method={quantizer.name} quantizes nothing")
    if not quantizer.plan:
        return QuantResult(quantizer.fn(model, cfg), None, None)
    plan = plan_from_config(cfg, model, model_name)
    options = GPTQOptions(damp=cfg.damp, act_order=cfg.act_order, params=QUANTIZERS.params_of(cfg))
    rule = rule_of(cfg.allocation)
    routing = rule.needs == "routing" and not cfg.plan
    needs_data = quantizer.calibration or routing
    windows = all_calibration_windows(tokens, known, calib) if needs_data else None
    if not cfg.plan:
        counts = None
        if routing:  # routing frequency from a statistics-light pass
            freq = capture(model, windows, batch_size=calib.batch_size, hessians=False)
            counts = {i: s.routed.tokens.cpu() for i, s in freq.layers.items()}
        allocate(plan, list(moe_layers(model)), cfg.allocation, significance=significance, counts=counts,
                 errors=errors)
    keep = cfg.export == ExportFormat.packed
    report, stats = quantizer.fn(model, plan, windows if quantizer.calibration else None, calib, options, keep)
    if report.rtn_fallback:
        log.warning("GPTQ: %d expert(s) quantized with RTN (no calibration signal or rtn_fallback): %s",
                    len(report.rtn_fallback), ", ".join(f"L{i}.E{e}" for i, e in report.rtn_fallback[:20]))
    return QuantResult(_summary(model, plan, report), plan, stats, report.codes if keep else None)


def _summary(model, plan: QuantPlan, report: QuantReport) -> dict:
    return {"method": plan.method, "allocation": plan.created_by.get("allocation", "uniform"),
            "matrices": report.matrices, "rtn_fallback": [list(x) for x in report.rtn_fallback],
            "gptq_loss": report.gptq_loss, "bits": bit_accounting(model, plan.spec_for)}

