"""The quantization stage of a run: a plan from the config, applied with RTN or GPTQ."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import moe_layers
from ..calibration import CalibrationStats
from ..calibration.stage import calibration_windows
from ..config import CalibConfig, QuantConfig, QuantMethod
from ..errors import UserError
from .apply import GPTQOptions, QuantReport, apply_plan, quantize_sequential
from .plan import QuantPlan
from .spec import QSpec

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    plan: QuantPlan
    report: QuantReport
    stats: CalibrationStats | None


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


def quantize(model, tokenizer, sources: dict, known: list[str], cfg: QuantConfig, calib: CalibConfig,
             model_name: str) -> QuantResult:
    plan = plan_from_config(cfg, model, model_name)
    options = GPTQOptions(damp=cfg.damp, act_order=cfg.act_order)
    if cfg.method == QuantMethod.rtn:
        return QuantResult(plan, apply_plan(model, plan, options=options), None)
    names = list(calib.datasets) if calib.datasets else list(known)
    if not names:
        raise UserError("GPTQ needs calibration data: set calib.datasets=[name, ...]")
    windows = torch.cat(list(calibration_windows(tokenizer, sources, names, calib).values()))
    log.info("GPTQ: calibrating on %d windows x %d tokens from %s", len(windows), calib.seqlen, ", ".join(names))
    report, stats = quantize_sequential(model, plan, windows, batch_size=calib.batch_size,
                                        hessian_weighting=calib.hessian_weighting.value, min_tokens=calib.min_tokens,
                                        policy=calib.policy.value, options=options)
    if report.rtn_fallback:
        log.warning("GPTQ: %d expert(s) quantized with RTN (no calibration signal or rtn_fallback): %s",
                    len(report.rtn_fallback), ", ".join(f"L{i}.E{e}" for i, e in report.rtn_fallback[:20]))
    return QuantResult(plan, report, stats)
