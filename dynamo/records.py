"""Run records: results/runs/<run-id>/result.json, written atomically.

The schema is documented in results/README.md. Metric names are stable across versions
(`metrics.ppl.<dataset>`, `metrics.lm_eval.<task>.<metric>`, later `metrics.avg_bits.*`)
because tables and users' scripts read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import save_file

from .config import REPO_ROOT
from .errors import UserError
from .finite import check_finite

if TYPE_CHECKING:
    from .result import RunResult

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
# Per-unit files beside result.json, by the metrics key whose mean they hold; paired comparisons
# (dynamo.stats) resample them. {dataset: [one value per evaluation window, in window order]}:
# window_nll* the mean token loss (of the run, of the eval.reference FP16 pass, of BQ alone when DQS
# is on), window_kl* the mean KL(FP16 || quantized) over the same windows.
WINDOW_FILES = {"ppl": "window_nll.json", "ppl_fp16": "window_nll_fp16.json", "ppl_bq": "window_nll_bq.json",
                "kl": "window_kl.json", "kl_bq": "window_kl_bq.json"}
# {task: {"doc_id": [...], "acc": [0/1 per question], "acc_norm": [...]}} for multiple-choice lm-eval tasks.
MC_CORRECT_FILE = "mc_correct.json"
# Keys that say where or how a run is logged (or whether to redo it), not what it computes.
# Resuming (resume.py) matches stored hashes: a change here must keep config_hash(record["config"])
# equal to each existing record's config_hash (excluding a key that old configs lack does).
UNHASHED_KEYS = ("logger", "results_dir", "hf_home", "tag", "force")
# Nested keys of the same kind: where the analysis cache lives, whether figures are drawn.
UNHASHED_NESTED = {"analysis": ("cache", "cache_dir", "figures")}
# Keys added after records existed: left out of the hash while at their default, so a config that
# does not use them keeps the hash of the records written before they existed.
NEW_KEY_DEFAULTS = {"quant": {"export": "none", "export_dataset": None, "params": {}, "export_params": {}},
                    "model": {"bos_windows": False, "offload": False},
                    "quant.allocation": {"params": {}}, "quant.switching": {"params": {}}}  # dotted: a nested node
NEW_TOP_KEY_DEFAULTS = {"plugins": []}  # the same, at the top level
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "lm_eval", "hydra-core", "omegaconf",
            "accelerate", "safetensors", "numpy", "wandb", "bitsandbytes", "triton")


def config_hash(config: dict) -> str:
    """Stable hash of what a run computes: same hash, same metrics (on the same machine)."""
    relevant = {k: v for k, v in config.items() if k not in UNHASHED_KEYS
                and not (k in NEW_TOP_KEY_DEFAULTS and v == NEW_TOP_KEY_DEFAULTS[k])}
    for key, inner in UNHASHED_NESTED.items():
        if isinstance(relevant.get(key), dict):
            relevant[key] = {k: v for k, v in relevant[key].items() if k not in inner}
    for path, defaults in NEW_KEY_DEFAULTS.items():
        node = relevant
        for part in path.split("."):  # copied on the way down: the caller's config is left as it was
            if not isinstance(node.get(part), dict):
                break
            node[part] = dict(node[part])
            parent, node = node, node[part]
        else:
            parent[part] = {k: v for k, v in node.items() if k not in defaults or v != defaults[k]}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def inputs_hash(inputs: dict[str, str]) -> str:
    """One short hash of a run's input fingerprints (dynamo/fingerprint.py), stable in key order."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def git_state(root: Path = REPO_ROOT) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


class RecordExists(FileExistsError):
    """A finished record is already at the path a run was about to write (it is never replaced)."""


def _publish_new(tmp: str, path: Path) -> None:
    """Move tmp to path only if nothing is there: a hard link fails atomically when path exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RecordExists(f"{path} already exists") from None
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race, never a partial file)
        if path.exists():
            raise RecordExists(f"{path} already exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp", replace: bool = True) -> Iterator[Path]:
    """A temporary sibling to write to; it replaces `path` when the block succeeds and is removed
    when it fails, so readers see the old file or the complete new one, never a partial write.
    replace=False: an existing `path` is kept and RecordExists raised instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read
        yield Path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict, replace: bool = True, indent: int | None = 2) -> None:
    """`indent=None`: one line, for large diagnostics (the tracked tree has a size limit)."""
    with atomic_path(path, replace=replace) as tmp, open(tmp, "w", encoding="utf-8") as f:
        # strict JSON: NaN/Infinity are not JSON, and a record holding them must never be written
        json.dump(payload, f, indent=indent, sort_keys=False, default=str, allow_nan=False,
                  separators=None if indent is not None else (",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file (never a pickle), written whole or not at all."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def provenance(device: torch.device) -> dict:
    """Where and when a run was computed: RunResult's created_at, device, git and versions."""
    return {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_info(device),
            "git": git_state(), "versions": package_versions()}


def record_of(result: RunResult) -> dict:
    """The one serialisation of a RunResult into result.json (schema: results/README.md)."""
    config, evaluation = result.config, result.evaluation
    metrics = {"ppl": evaluation.run.ppl}
    if result.fp16 is not None:
        metrics["ppl_fp16"] = result.fp16.ppl
    if evaluation.bq is not None:
        metrics["ppl_bq"] = evaluation.bq.ppl
        metrics.update(evaluation.bq.fidelity_metrics("_bq"))
    metrics.update(evaluation.run.fidelity_metrics())
    if evaluation.stream is not None:
        metrics["stream"] = evaluation.stream
    if result.avg_bits is not None:
        metrics["avg_bits"] = result.avg_bits
    protocol = {"ppl": evaluation.run.protocol}
    if result.lm_eval is not None:
        metrics["lm_eval"] = result.lm_eval.result.metrics
        protocol["lm_eval"] = result.lm_eval.protocol
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": result.run_id,
        "created_at": result.created_at,
        "config_hash": config_hash(config),
        "model": result.model,
        "quant": config["quant"],
        "dataset": {"name": config["dataset"]["name"], "known": config["dataset"]["known"]},
        "seed": config["seed"],
        "device": result.device,
        "git": result.git,
        "versions": result.versions,
        "metrics": metrics,
        "protocol": protocol,
        "timings": result.timings,
        "overrides": result.overrides,
        "config": config,
    }
    optional = {"calibration": result.calibration, "analysis": result.analysis,
                "switching": evaluation.switching.to_dict() if evaluation.switching is not None else None,
                "quantization": result.quantization, "export": result.export}
    record.update({key: value for key, value in optional.items() if value is not None})
    if result.inputs is not None:  # records written before fingerprints existed have neither key
        # resume reuses a record only for the same bytes in every input file (dynamo/fingerprint.py)
        record["inputs_hash"] = inputs_hash(result.inputs)
        record["inputs"] = result.inputs
    return record


def sample_files(result: RunResult) -> dict[str, dict]:
    """The files beside result.json that paired comparisons resample: {file name: payload}."""
    evaluation = result.evaluation
    passes = {"ppl": evaluation.run, "ppl_fp16": result.fp16, "ppl_bq": evaluation.bq}
    files = {WINDOW_FILES[key]: p.window_nll for key, p in passes.items() if p is not None}
    for key, p in (("kl", evaluation.run), ("kl_bq", evaluation.bq)):
        if p is not None and p.window_kl is not None:
            files[WINDOW_FILES[key]] = p.window_kl
    if result.lm_eval is not None and result.lm_eval.result.per_question:
        files[MC_CORRECT_FILE] = result.lm_eval.result.per_question  # paired accuracy intervals (dynamo.stats)
    return files


def write_run(result: RunResult, run_dir: Path, hint: str) -> dict:
    """Check every number, then write the sample files and, last, result.json; returns the record.
    `hint` says what to do when a number is NaN or infinite (then nothing is written)."""
    record, files = record_of(result), sample_files(result)
    check_finite(record, "the run's record", hint)
    check_finite({k: v for k, v in files.items() if k.startswith("window_nll")}, "the per-window losses", hint)
    check_finite({k: v for k, v in files.items() if k.startswith("window_kl")}, "the per-window KL", hint)
    if (Path(run_dir) / RESULT_FILE).exists():  # another run's finished record: never overwritten
        raise UserError(f"{run_dir} already holds a {RESULT_FILE}; it is never overwritten (nothing was written)")
    for name, payload in files.items():
        write_json_atomic(Path(run_dir) / name, payload)
    try:
        write_json_atomic(Path(run_dir) / RESULT_FILE, record, replace=False)
    except RecordExists:
        raise UserError(f"{run_dir} got a {RESULT_FILE} from another process while this run finished; "
                        "it was kept and this run's record was not written") from None
    return record


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_strict_json(path: Path):
    """A JSON file, refusing NaN/Infinity (Python's json accepts them by default)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=_refuse_constant)
