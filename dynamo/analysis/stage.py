"""The analysis stage of a run: per-dataset routed captures (cached) -> Significance."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..adapters import moe_layers
from ..calibration import capture
from ..calibration.stage import calibration_windows
from ..config import AnalysisConfig
from ..errors import UserError
from ..tokens import RunTokens
from . import cache
from .significance import Significance, statistics_for

log = logging.getLogger(__name__)


def analysis_datasets(cfg: AnalysisConfig, known: list[str]) -> list[str]:
    names = list(cfg.datasets) if cfg.datasets else list(known)
    if not names:
        raise UserError("DynaMo's analysis needs datasets: the dataset suite declares no known datasets; "
                        "set analysis.datasets=[name, ...]")
    return names


def analyze(model, tokens: RunTokens, names: list[str], cfg: AnalysisConfig, *, model_path: str,
            revision: str | None = None, seed: int = 0) -> tuple[Significance, dict]:
    """Significance of every dataset in `names`, and a report (cache hits, capture seconds)."""
    windows = calibration_windows(tokens, names, cfg, node="analysis")
    layers = list(moe_layers(model))
    cache_dir = Path(cfg.cache_dir).expanduser()
    fingerprint = cache.model_fingerprint(model, model_path, revision)
    statistics = statistics_for(cfg.channel_metric)
    captures, report = {}, {}
    for name, w in windows.items():
        key = cache.capture_key(fingerprint, name, w, seed, statistics)
        hit = cache.load(cache_dir, key) if cfg.cache else None
        if hit is not None:
            captures[name], seconds = hit
        else:
            t = time.perf_counter()
            captures[name] = capture(model, w, batch_size=cfg.batch_size, hessians=False, statistics=statistics)
            seconds = time.perf_counter() - t
            if cfg.cache:
                cache.store(cache_dir, key, captures[name], seconds)
        report[name] = {"cache": "hit" if hit is not None else "miss", "capture_s": round(seconds, 3),
                        "windows": int(w.shape[0]), "seqlen": int(w.shape[1]), "token_ids": key["token_ids"]}
        log.info("analysis %-12s %s (%d windows, capture %.1f s)", name, report[name]["cache"], w.shape[0], seconds)
    meta = {"model": model_path, "fingerprint": fingerprint, "seed": seed, "datasets": report}
    sig = Significance.from_captures(captures, layers, cfg.channel_metric, cfg.channel_unit.value, meta)
    return sig, {"captures": report, "capture_s": round(sum(r["capture_s"] for r in report.values()), 3)}
