"""The per-window values behind a record's metrics, checked against the record (a stale file is an error),
and the paired-bootstrap interval of one row against its reference."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import stats


class StaleSamplesError(ValueError):
    """A per-window file does not reproduce its record's metric: it belongs to another run or was edited."""


@lru_cache(maxsize=None)
def _samples(run_dir: str, name: str) -> dict[str, np.ndarray]:
    return stats.load_samples(Path(run_dir), name)


def window_values(record: dict, key: str, dataset: str) -> np.ndarray:
    """The per-window values behind record["metrics"][key][dataset]; MissingSamplesError when absent,
    StaleSamplesError when they do not give the recorded number (never silently compare other data)."""
    values = _samples(record["_dir"], stats.SAMPLE_FILES[key])
    if dataset not in values:
        raise stats.MissingSamplesError(f"{record['_path']}/{stats.SAMPLE_FILES[key]} lacks '{dataset}'")
    window, recorded = values[dataset], record["metrics"][key][dataset]
    pooled = math.exp(window.mean()) if key.startswith("ppl") else window.mean()
    if not math.isclose(pooled, recorded, rel_tol=1e-6, abs_tol=1e-12):
        raise StaleSamplesError(f"{record['_path']}/{stats.SAMPLE_FILES[key]} gives {key}.{dataset} = {pooled:.6g}, "
                                f"its result.json says {recorded:.6g}: restore the run folder's files or re-run it")
    return window


_INTERVALS: dict[tuple, stats.Interval | None] = {}  # one bootstrap per pair of runs and dataset, per call


def paired_interval(kind: str, ref: tuple[dict, str], row: tuple[dict, str], dataset: str) -> stats.Interval | None:
    """Interval of a (record, metrics key) row against its reference on one dataset: the PPL ratio
    (kind "ppl") or the share of KL removed (kind "kl"); None when the runs have no per-window data to pair."""
    key = (kind, ref[0]["_dir"], ref[1], row[0]["_dir"], row[1], dataset)
    if key not in _INTERVALS:
        try:
            a, b = window_values(ref[0], ref[1], dataset), window_values(row[0], row[1], dataset)
            _INTERVALS[key] = stats.ppl_ratio(a, b) if kind == "ppl" else stats.damage_removed(a, b)
        except (stats.MissingSamplesError, stats.PairingError):
            _INTERVALS[key] = None
    return _INTERVALS[key]


def clear_caches() -> None:
    """Forget the loaded files and intervals: files may have changed since an earlier call."""
    _samples.cache_clear(), _INTERVALS.clear()
