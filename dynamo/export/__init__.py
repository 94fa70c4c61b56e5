"""Quantized models for other tools: quant.export=packed|dequantized|gptqmodel at the end of a run.

One registry (`EXPORTERS`) maps each format to its check, run before any work so a run that
cannot export fails in seconds, and its writer, run after every evaluation. README: "Using the
quantized model elsewhere".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ..config import ExportFormat
from ..errors import UserError
from . import dequantized, gptqmodel, packed


@dataclass(frozen=True)
class Exporter:
    check: Callable[[DictConfig, object], None]            # (cfg, model) -> raises UserError
    write: Callable[[object, object, DictConfig, Path], dict]  # (loaded, stage, cfg, run_dir) -> record["export"]


EXPORTERS: dict[ExportFormat, Exporter] = {
    ExportFormat.packed: Exporter(packed.check, packed.write),
    ExportFormat.dequantized: Exporter(dequantized.check, dequantized.write),
    ExportFormat.gptqmodel: Exporter(gptqmodel.check, gptqmodel.write),
}


def check_export(cfg: DictConfig, model, sources: dict) -> None:
    """Refuse an export this run cannot write; `sources` are the dataset's (any may be switched to)."""
    quant = cfg.quant
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
            raise UserError(f"quant.export_dataset={quant.export_dataset} is not a dataset of '{cfg.dataset.name}' "
                            f"(available: {sorted(sources)})")
    if quant.export != ExportFormat.none:
        EXPORTERS[quant.export].check(cfg, model)


def write_export(loaded, stage, cfg: DictConfig, run_dir: Path) -> dict:
    return EXPORTERS[cfg.quant.export].write(loaded, stage, cfg, run_dir)
