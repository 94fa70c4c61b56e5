"""Content fingerprints of a run's input files, so a record is reused only for the same bytes.

`config_hash` names files by path: replace the data file at the same path and resume used to hand
back the old record (its PPL computed on other text). A run now also records `inputs` (each local
input file's size and SHA-256) and their `inputs_hash` (dynamo/records.py); resume (dynamo/resume.py)
reuses a record only when both hashes match. Hashing a checkpoint on every launch would cost seconds to minutes, so a
digest is cached by (path, size, mtime_ns): a file is read again only when it changed.
Hub models and datasets are named by id and revision in the config itself and are not hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import SourceKind
from .data import EMBEDDED_DIR, sources_of

log = logging.getLogger(__name__)

CHUNK = 1 << 22
_memory: dict[str, dict] = {}  # this process's digests (a sweep's jobs share one process)


def cache_file() -> Path:
    root = os.environ.get("DYNAMO_CACHE") or "~/.cache/dynamo"
    return Path(root).expanduser() / "fingerprints.json"


def _load_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: digests are recomputed, never trusted from a bad file


def _save_cache(entries: dict) -> None:
    from .records import write_json_atomic

    try:
        write_json_atomic(cache_file(), entries)
    except OSError as err:  # a read-only home must not fail a run; the next one hashes again
        log.debug("fingerprint cache not written: %s", err)


def file_digest(path: Path, cache: dict | None = None) -> str:
    """'<size>:<sha256 prefix>' of a file; read only when (path, size, mtime_ns) is not cached."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    cache = _memory if cache is None else cache
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
        return hit["digest"]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    digest = f"{stat.st_size}:{sha.hexdigest()[:32]}"
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": digest}
    return digest


def _local_model_dir(path: str | None) -> Path | None:
    if not path:
        return None
    folder = Path(str(path)).expanduser()
    return folder if folder.is_dir() else None


def input_files(cfg: DictConfig) -> dict[str, Path]:
    """{label: file} of every local file the run may read: data and calibration files of each
    source, the checkpoint folder's files (weights, config, tokenizer), and a quant.plan file."""
    files: dict[str, Path] = {}
    for name, source in sources_of(cfg.dataset).items():
        if source.kind == SourceKind.embedded:
            for split in ("calib", "test"):
                files[f"data/{name}/{split}"] = EMBEDDED_DIR / str(source.path) / f"{split}.jsonl"
        elif source.kind == SourceKind.local:
            files[f"data/{name}/test"] = Path(str(source.path)).expanduser()
            if source.calib_path:
                files[f"data/{name}/calib"] = Path(source.calib_path).expanduser()
    model_path = OmegaConf.select(cfg, "model.path", throw_on_missing=False)
    folder = _local_model_dir(model_path)
    if folder is not None:
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                files[f"model/{file.name}"] = file
    plan = OmegaConf.select(cfg, "quant.plan", throw_on_missing=False)
    if plan:
        files["quant.plan"] = Path(plan).expanduser()
    return {label: path for label, path in files.items() if path.is_file()}


def fingerprint_inputs(cfg: DictConfig) -> dict[str, str]:
    """{label: digest} of input_files(cfg), through the on-disk cache."""
    files = input_files(cfg)
    if not files:
        return {}
    cache = _load_cache()
    before = {k: dict(v) for k, v in cache.items() if isinstance(v, dict)}
    out = {}
    for label, path in files.items():
        key = str(path.resolve())
        if key in _memory and key not in cache:
            cache[key] = _memory[key]
        out[label] = file_digest(path, cache)
        _memory[key] = cache[key]
    if cache != before:
        _save_cache(cache)
    return out
