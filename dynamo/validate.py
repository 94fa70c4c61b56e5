"""Checks a run makes before any model work: value ranges, every data file it will read, the checkpoint.

Each failure is a UserError (run.py prints it as one `error:` line and exits 2). The pipeline
calls `validate_run` first, so a bad value or file fails in seconds, not after the offline stage.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data import known_datasets, load_documents, sources_of
from .errors import UserError
from .registry import QUANTIZERS, check_names


def _at_least(name: str, value, low: int) -> None:
    if value is not None and value < low:
        raise UserError(f"{name}={value} must be >= {low}")


def check_ranges(cfg: DictConfig) -> None:
    """Values the schema's types allow but the run cannot use (they used to fail deep inside, or silently)."""
    for node in ("eval", "calib", "analysis"):
        _at_least(f"{node}.seqlen", cfg[node].seqlen, 2)  # a window predicts seqlen - 1 tokens
        _at_least(f"{node}.batch_size", cfg[node].batch_size, 1)
    for node in ("calib", "analysis"):
        if cfg[node].split == "test":
            raise UserError(f"{node}.split=test would calibrate on the evaluation data; use {node}.split=calib")
    _at_least("eval.max_windows", cfg.eval.max_windows, 1)
    _at_least("calib.windows", cfg.calib.windows, 1)
    _at_least("analysis.windows", cfg.analysis.windows, 1)
    _at_least("eval.stream_windows", cfg.eval.stream_windows, 1)
    _at_least("eval.stream_batch_size", cfg.eval.stream_batch_size, 1)
    frac = cfg.analysis.dynamic_channel_frac
    if not 0 < frac <= 1:
        raise UserError(f"analysis.dynamic_channel_frac={frac} must be in (0, 1] (a share of each expert's channels)")
    if QUANTIZERS.get(cfg.quant.method).plan and cfg.quant.plan is None:
        from .quant.allocation import rule_of

        rule = rule_of(cfg.quant.allocation)
        if rule.check is not None:  # e.g. target_bits inside the widths the rule chooses from
            rule.check(cfg.quant.allocation)


def calibration_sources(cfg: DictConfig, evaluated: list[str]) -> list[str]:
    """The sources whose calib split the run reads: calibration, DynaMo's analysis, DQS's switch profiles."""
    from .analysis import analysis_datasets
    from .quant.stage import needs_analysis

    known = known_datasets(cfg.dataset)
    names: list[str] = []
    quantizer = QUANTIZERS.get(cfg.quant.method)
    quantizing = quantizer.name != "none"
    if cfg.calib.enabled or quantizer.plan:
        names += list(cfg.calib.datasets or known)
    if quantizing and needs_analysis(cfg.quant):
        names += analysis_datasets(cfg.analysis, known)
        if cfg.quant.switching.enabled:
            names += evaluated
    return list(dict.fromkeys(names))


def check_calibration_data(cfg: DictConfig, sources: dict, evaluated: list[str]) -> None:
    """Read every calib split the run will use now, so a bad calibration file fails at start-up
    (the evaluated test splits are read by the pipeline right after, also before the model)."""
    for name in calibration_sources(cfg, evaluated):
        if name in sources:  # an unknown name is refused by its stage, with the list of choices
            load_documents(sources[name], "calib")


def check_checkpoint(path: str) -> None:
    """A local checkpoint's safetensors files must be complete: each header's tensors end within the file."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
            raise UserError(f"model.path={path}: {file.name} is not a valid safetensors file ({err}); "
                            "re-download or re-save the checkpoint") from None
        if 8 + header_len + end > size:
            raise UserError(f"model.path={path}: {file.name} is truncated ({size} bytes, its header needs "
                            f"{8 + header_len + end}); re-download or re-save the checkpoint")


def check_required(cfg: DictConfig) -> None:
    """Every value set, and every registry name known (after importing cfg.plugins)."""
    check_names(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required value(s): {', '.join(missing)}; set them on the command line, "
                        f"e.g. {missing[0]}=...")


def validate_run(cfg: DictConfig, evaluated: dict) -> None:
    """Everything that can be checked before the model is loaded (`evaluated`: the sources to evaluate)."""
    check_required(cfg)
    check_ranges(cfg)
    check_calibration_data(cfg, sources_of(cfg.dataset), list(evaluated))
    if cfg.model.path and (cfg.model.path.startswith(("/", ".", "~")) or Path(cfg.model.path).expanduser().exists()):
        check_checkpoint(cfg.model.path)
