"""Quantized models for other tools: quant.export=packed|dequantized|gptqmodel at the end of a run.

One registry (`EXPORTERS`) maps each format to its check, run before any work so a run that
cannot export fails in seconds, its writer, run after every evaluation, and optionally a dataclass of
its own settings (quant.export_params, read with `export_params(quant)`; registry.parse_params). Both get the config
nodes they read (quant, model, and analysis for the check), not the whole config. docs/export.md: "Using
the quantized model elsewhere".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import AnalysisConfig, ExportFormat, ModelConfig, QuantConfig
from ..errors import UserError
from ..registry import parse_params
from . import dequantized, gptqmodel, packed


@dataclass(frozen=True)
class Exporter:
    check: Callable[[QuantConfig, ModelConfig, AnalysisConfig, object], None]  # (..., model) -> raises UserError
    write: Callable[[object, object, QuantConfig, ModelConfig, Path], dict]    # (loaded, stage, ..., run_dir)
                                                                               #   -> record["export"]
    params: type | None = None                                                 # its settings' dataclass


EXPORTERS: dict[ExportFormat, Exporter] = {
    ExportFormat.packed: Exporter(packed.check, packed.write),
    ExportFormat.dequantized: Exporter(dequantized.check, dequantized.write),
    ExportFormat.gptqmodel: Exporter(gptqmodel.check, gptqmodel.write),
}


def check_export(quant: QuantConfig, model_cfg: ModelConfig, analysis: AnalysisConfig, model, sources: dict,
                 suite: str) -> None:
    """Refuse an export this run cannot write; `sources` are those of the dataset suite `suite` (any
    may be switched to)."""
    if quant.export_packed:
        raise UserError("quant.export_packed was replaced by quant.export=packed (also: dequantized, gptqmodel); "
                        "re-run with quant.export=packed")
    if quant.export_dataset is not None:
        if quant.export != ExportFormat.dequantized:
            raise UserError(f"quant.export_dataset exports the model as DQS switched it, which only the dequantized "
                            f"export holds (quant.export={quant.export.value}; a packed model saves BQ and switches "
                            f"after loading, dynamo.packed.switching): use quant.export=dequantized")
        if not quant.switching.enabled:
            raise UserError("quant.export_dataset switches the model with DQS before exporting: use a DynaMo quant "
                            "with switching (e.g. quant=dynamo_3bit)")
        if quant.export_dataset not in sources:
            raise UserError(f"quant.export_dataset={quant.export_dataset} is not a dataset of '{suite}' "
                            f"(available: {sorted(sources)})")
    export_params(quant)
    if quant.export != ExportFormat.none:
        EXPORTERS[quant.export].check(quant, model_cfg, analysis, model)


def export_params(quant: QuantConfig) -> Any:
    """quant.export_params as the chosen format's dataclass (None when it declares none), or one UserError."""
    exporter = EXPORTERS.get(quant.export)
    return parse_params(exporter.params if exporter else None, getattr(quant, "export_params", None),
                        "quant.export_params", f"quant.export={quant.export.value}")


def write_export(loaded, stage, quant: QuantConfig, model_cfg: ModelConfig, run_dir: Path) -> dict:
    return EXPORTERS[quant.export].write(loaded, stage, quant, model_cfg, run_dir)
