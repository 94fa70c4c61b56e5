"""Reuse per-dataset captures across runs and sweeps instead of recomputing them.

A capture is keyed by what determines it: the model (path, revision, dtype, and a hash of
its router weights, so a retrained or different checkpoint never hits), the exact token
windows (a hash of the ids: dataset, split, tokenizer, seqlen and sample count all enter
through them), and the seed. The channel metric is not part of the key: every built-in metric
is derived from the same capture, so one capture serves a metric sweep; a metric that asks for a
registered statistic of its own (dynamo.registry.register_statistic) adds its name to the key,
because its captures hold that sum too. A registered statistic is named, not versioned: changing
what a name computes needs a new name (or CAPTURE_VERSION bumped). Each entry is a folder
`<cache_dir>/<key>/` with the capture (safetensors + JSON, no pickles) and `key.json`, which
holds the key and the SHA-256 of the capture files. An entry is written in a temporary folder and
renamed into place, so readers never see a partial one; an entry whose files do not match their
checksums (truncated, edited) or do not load is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..adapters import moe_layers
from ..calibration import CalibrationStats
from ..records import write_json_atomic

log = logging.getLogger(__name__)

CAPTURE_VERSION = 1  # bump when capture statistics change meaning


def model_fingerprint(model, path: str, revision: str | None) -> str:
    h = hashlib.sha256(f"{path}|{revision}|{next(model.parameters()).dtype}".encode())
    for layer in moe_layers(model):
        h.update(layer.router.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def capture_key(fingerprint: str, dataset: str, windows: torch.Tensor, seed: int,
                statistics: tuple[str, ...] = ()) -> dict:
    ids = hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]
    key = {"capture_version": CAPTURE_VERSION, "model": fingerprint, "dataset": dataset,
           "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "token_ids": ids, "seed": seed}
    if statistics:  # only then: the keys of captures with the built-in statistics alone stay as they were
        key["statistics"] = sorted(statistics)
    return key


def _folder(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{key['dataset']}-{digest}"


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("capture.*"))}


def load(cache_dir: Path, key: dict) -> tuple[CalibrationStats, float] | None:
    """(capture, seconds it took to compute) or None on a miss; a corrupt entry is a miss, with a warning."""
    folder = _folder(cache_dir, key)
    try:
        stored = json.loads((folder / "key.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    try:
        if stored.get("sha256") != _checksums(folder):
            raise ValueError("its files do not match their checksums")
        return CalibrationStats.load(folder / "capture"), float(stored.get("capture_s", 0.0))
    except Exception as err:  # any damage (safetensors, JSON, missing tensors): recompute, never fail the run
        log.warning("analysis cache entry %s is corrupt (%s: %s); recomputing it", folder, type(err).__name__, err)
        return None


def store(cache_dir: Path, key: dict, stats: CalibrationStats, capture_s: float) -> Path:
    """Write the entry in a temporary folder, then rename it into place (replacing a corrupt one)."""
    folder = _folder(cache_dir, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{folder.name}."))
    try:
        stats.save(tmp / "capture")
        write_json_atomic(tmp / "key.json", {"key": key, "capture_s": round(capture_s, 3),
                                             "sha256": _checksums(tmp)})
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "key.json").is_file():
                raise
            # another run stored the same entry meanwhile: theirs is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
