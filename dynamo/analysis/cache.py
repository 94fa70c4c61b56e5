"""Reuse per-dataset captures across runs and sweeps instead of recomputing them.

A capture is keyed by what determines it: the model (path, revision, dtype, and a hash of
its router weights, so a retrained or different checkpoint never hits), the exact token
windows (a hash of the ids: dataset, split, tokenizer, seqlen and sample count all enter
through them), and the seed. The channel metric is not part of the key: every metric is
derived from the same capture, so one capture serves a metric sweep. Each entry is a folder
`<cache_dir>/<key>/` with the capture (safetensors + JSON, no pickles) and `key.json`,
written last: an entry without `key.json` is an interrupted write and is ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..adapters import moe_layers
from ..calibration import CalibrationStats
from ..records import write_json_atomic

CAPTURE_VERSION = 1  # bump when capture statistics change meaning


def model_fingerprint(model, path: str, revision: str | None) -> str:
    h = hashlib.sha256(f"{path}|{revision}|{next(model.parameters()).dtype}".encode())
    for layer in moe_layers(model):
        h.update(layer.router.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def capture_key(fingerprint: str, dataset: str, windows: torch.Tensor, seed: int) -> dict:
    ids = hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]
    return {"capture_version": CAPTURE_VERSION, "model": fingerprint, "dataset": dataset,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "token_ids": ids, "seed": seed}


def _folder(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{key['dataset']}-{digest}"


def load(cache_dir: Path, key: dict) -> tuple[CalibrationStats, float] | None:
    """(capture, seconds it took to compute) or None on a miss."""
    folder = _folder(cache_dir, key)
    try:
        stored = json.loads((folder / "key.json").read_text())
    except (OSError, ValueError):
        return None
    if stored.get("key") != key:
        return None
    return CalibrationStats.load(folder / "capture"), float(stored.get("capture_s", 0.0))


def store(cache_dir: Path, key: dict, stats: CalibrationStats, capture_s: float) -> Path:
    folder = _folder(cache_dir, key)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stats.save(folder / "capture")
    write_json_atomic(folder / "key.json", {"key": key, "capture_s": round(capture_s, 3)})
    return folder
