"""Quantizers and plans: QSpec, QuantPlan, RTN, GPTQ, apply_plan, bit accounting."""

from .apply import GPTQOptions, QuantReport, apply_plan, quantize_sequential
from .bits import bit_accounting
from .gptq import quantize_gptq
from .plan import QuantPlan
from .rtn import QuantizedWeight, quantize_rtn
from .spec import SUPPORTED_BITS, QSpec

__all__ = ["GPTQOptions", "QuantReport", "apply_plan", "quantize_sequential", "bit_accounting", "quantize_gptq",
           "QuantPlan", "QuantizedWeight", "quantize_rtn", "SUPPORTED_BITS", "QSpec"]
