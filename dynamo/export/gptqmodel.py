"""quant.export=gptqmodel: the run's plan as GPTQModel's (and vLLM's) per-module `dynamic` quantize config.

Written where the format can say it (dynamo.quant.export.to_gptqmodel_dynamic): families whose
experts are one nn.Linear per projection (ModuleList) and widths GPTQModel has kernels for. It is
the quantize config only: GPTQModel quantizes the model itself with these per-module widths; the
packed GPTQ tensors are not written here.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import moe_layers
from ..config import AnalysisConfig, ModelConfig, QuantConfig
from ..errors import UserError
from ..quant.export import GPTQMODEL_BITS, to_gptqmodel_dynamic
from ..quant.plan import QuantPlan
from ..records import write_json_atomic
from ..registry import QUANTIZERS

EXPORT_FILE = "gptqmodel_quantize_config.json"
ALTERNATIVE = "use quant.export=dequantized (a standard checkpoint any tool loads)"


def configured_widths(quant) -> set[int]:
    """The widths a run's allocation can give an expert or shared expert (plan files: checked on export)."""
    from ..quant.allocation import offered_widths

    widths = offered_widths(quant.allocation) or {quant.bits}
    if quant.shared_expert_bits is not None:
        widths.add(quant.shared_expert_bits)
    return widths


def check(quant: QuantConfig, model_cfg: ModelConfig, analysis: AnalysisConfig, model) -> None:
    if not QUANTIZERS.get(quant.method).plan:
        raise UserError(f"quant.export=gptqmodel describes a plan of per-expert widths, not quant.method="
                        f"{quant.method}")
    if any(layer.adapter.storage != "module_list" for layer in moe_layers(model)):
        raise UserError(f"quant.export=gptqmodel: {model_cfg.name} keeps its experts fused in 3-D parameters "
                        f"(transformers 5), which GPTQModel's per-module rules cannot address; {ALTERNATIVE}")
    odd = sorted(w for w in configured_widths(quant) if w not in (*GPTQMODEL_BITS, 16))
    if odd and quant.plan is None:
        raise UserError(f"quant.export=gptqmodel: this allocation can choose {odd}-bit experts, which GPTQModel "
                        f"cannot pack (it packs {list(GPTQMODEL_BITS)}); {ALTERNATIVE}, or drop those widths")


def write(loaded, stage, quant: QuantConfig, model_cfg: ModelConfig, run_dir: Path) -> dict:
    plan = QuantPlan.load(run_dir / "plan.json")
    try:
        config = to_gptqmodel_dynamic(plan, loaded.model)
    except UserError as err:
        raise UserError(f"quant.export=gptqmodel: {err}; {ALTERNATIVE}") from None
    write_json_atomic(run_dir / EXPORT_FILE, config)
    return {"format": "gptqmodel", "path": EXPORT_FILE, "bits": config["bits"], "rules": len(config["dynamic"])}
