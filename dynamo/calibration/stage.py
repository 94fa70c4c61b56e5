"""The calibration stage of a run: calibration windows from the configured datasets -> stats."""

from __future__ import annotations

import logging

import torch

from ..config import CalibConfig
from ..errors import UserError
from ..tokens import RunTokens
from .capture import capture, capture_sequential
from .stats import CalibrationStats

log = logging.getLogger(__name__)


def calibration_windows(tokens: RunTokens, names: list[str], cfg: CalibConfig,
                        node: str = "calib") -> dict[str, torch.Tensor]:
    """Each named source's calib-split windows; `node` is the config node of `cfg` (calib or analysis)."""
    if cfg.split == "test":
        raise UserError("calib.split=test would calibrate on the evaluation data; use calib.split=calib")
    unknown = [n for n in names if n not in tokens.sources]
    if unknown:
        raise UserError(f"calib.datasets names {unknown}, not in the dataset suite "
                        f"(available: {sorted(tokens.sources)})")
    return {name: tokens.windows(name, cfg.split, cfg.seqlen, cfg.windows, label=f"{name} ({cfg.split} split)",
                                 setting=f"{node}.seqlen") for name in names}


def all_calibration_windows(tokens: RunTokens, known: list[str], cfg: CalibConfig) -> torch.Tensor:
    """The windows of every calibration dataset (calib.datasets, else the known ones), concatenated."""
    names = list(cfg.datasets) if cfg.datasets else list(known)
    if not names:
        raise UserError("no calibration datasets: the dataset suite declares no known datasets; "
                        "set calib.datasets=[name, ...]")
    windows = torch.cat(list(calibration_windows(tokens, names, cfg).values()))
    log.info("calibration: %d windows x %d tokens from %s", len(windows), cfg.seqlen, ", ".join(names))
    return windows


def calibrate(model, tokens: RunTokens, known: list[str], cfg: CalibConfig) -> CalibrationStats:
    """One capture over the calibration windows of every calibration dataset, concatenated."""
    all_windows = all_calibration_windows(tokens, known, cfg)
    fn = capture_sequential if cfg.sequential else capture
    return fn(model, all_windows, batch_size=cfg.batch_size, hessians=cfg.hessians,
              hessian_weighting=cfg.hessian_weighting.value, min_tokens=cfg.min_tokens, policy=cfg.policy.value)
