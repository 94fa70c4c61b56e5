"""Export a QuantPlan as GPTQModel's per-module `dynamic` quantize config, where it can be said.

GPTQModel (and vLLM's GPTQ loader, which reads the same field) overrides the base config per
module: `dynamic` maps a regex over module names to {"bits", "group_size", "sym", ...}, and a
"-:"-prefixed regex leaves the matched modules unquantized. We emit the most common expert
width as the base, one exact-name rule per expert projection that differs, and "-:" rules for
everything the plan keeps in 16 bits (attention, routers, shared experts at 16 bits).

Refused, with the reason, where the format cannot express the plan:
- fused expert storage (transformers 5 OLMoE/Qwen/Mixtral/DeepSeek-V2/V3 keep a layer's experts
  in one 3-D parameter, and gate and up in one matrix): a per-module rule cannot address one
  expert's slice;
- widths GPTQModel has no kernel for (it packs 2, 3, 4 and 8 bits; 6 is not among them);
- act-order plans are not produced by this harness's plan format, so nothing to refuse there.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ..adapters import SHARED, moe_layers
from ..errors import UserError
from .plan import QuantPlan

GPTQMODEL_BITS = (2, 3, 4, 8)


def _linear_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def to_gptqmodel_dynamic(plan: QuantPlan, model: nn.Module) -> dict:
    """A GPTQModel quantize_config dict (bits, group_size, sym, desc_act, dynamic) for `plan`."""
    layers = list(moe_layers(model))
    if any(layer.adapter.storage != "module_list" for layer in layers):
        raise UserError("this model keeps its experts fused in 3-D parameters (transformers 5): GPTQModel's "
                        "per-module `dynamic` rules cannot give experts different widths; use the plan JSON")
    names = _linear_names(model)
    specs: dict[str, object] = {}
    keep_fp16: list[str] = []
    for layer in layers:
        for expert, projection, _ in layer.matrices():
            module = (getattr(layer.shared_expert, f"{projection}_proj") if expert == SHARED
                      else getattr(layer.experts[expert], f"{projection}_proj"))
            spec = plan.spec_for(layer.index, expert, projection)
            if spec.is_float:
                keep_fp16.append(names[id(module)])
            elif spec.bits not in GPTQMODEL_BITS:
                raise UserError(f"layer {layer.index} expert {expert} {projection} is {spec.bits}-bit; GPTQModel "
                                f"packs only {GPTQMODEL_BITS}, so this plan has no GPTQModel form")
            else:
                specs[names[id(module)]] = spec
        router = layer.router
        if isinstance(router, nn.Linear):
            keep_fp16.append(names[id(router)])
    if not specs:
        raise UserError("the plan quantizes no expert: nothing to export")
    base = Counter(specs.values()).most_common(1)[0][0]
    dynamic: dict[str, dict] = {}
    # 16-bit modules first: vLLM and GPTQModel take the first rule that matches
    for name in keep_fp16:
        dynamic[f"-:{re.escape(name)}$"] = {}
    dynamic["-:.*\\.self_attn\\..*"] = {}  # attention stays 16-bit in every plan of this harness
    for name, spec in specs.items():
        if spec != base:
            dynamic[f"+:{re.escape(name)}$"] = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
    return {"quant_method": "gptq", "bits": base.bits, "group_size": base.group_size, "sym": base.sym,
            "desc_act": False, "lm_head": False, "dynamic": dynamic}
