"""Resumable runs: a run whose configuration already has a record reuses it instead of recomputing.

A record is found by its `config_hash` (records.py: what a run computes, not where it is logged)
and its `inputs_hash` (records.py, of dynamo/fingerprint.py's digests: the bytes of every local input file), anywhere
under `results_dir`. Records are written last and atomically, so a job killed mid-run
leaves none, and re-launching a killed sweep recomputes only the jobs that are missing.
`force=true` recomputes regardless.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import to_container
from .records import RESULT_FILE, config_hash, load_strict_json

log = logging.getLogger(__name__)


def find_record(results_dir: str | Path, digest: str, inputs: str | None = None) -> Path | None:
    """The newest result.json under results_dir (at any depth) whose config_hash is `digest` and,
    given `inputs`, whose inputs_hash is `inputs` (the same bytes in every input file)."""
    root = Path(results_dir)
    if not root.is_dir():
        return None
    matches = []
    for path in root.rglob(RESULT_FILE):
        try:
            record = load_strict_json(path)  # a record with NaN/Infinity is never reused
        except (OSError, UnicodeDecodeError, ValueError) as err:
            # not ours to judge or delete: a hand-edited or foreign file must not stop a sweep
            log.warning("skipping unreadable record %s: %s", path, err)
            continue
        if isinstance(record, dict) and record.get("config_hash") == digest:
            if inputs is not None and record.get("inputs_hash") != inputs:
                # a data file, calibration file or checkpoint changed at the same path (or the record
                # predates fingerprints): its metrics are not this run's
                log.info("not reusing %s: its input files differ (inputs_hash)", path)
                continue
            matches.append(path)
    # several records of one config (force=true reruns): the newest stands for it
    return max(matches, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


def reusable_record(cfg: DictConfig) -> Path | None:
    """The record this run would reproduce, or None when it must run (force=true, or none yet)."""
    from omegaconf.errors import InterpolationResolutionError

    from .errors import UserError
    from .fingerprint import fingerprint_inputs
    from .records import inputs_hash

    try:
        if cfg.force or OmegaConf.missing_keys(cfg):
            return None  # incomplete configs have no record: the pipeline refuses them with its own message
        digest = config_hash(to_container(cfg))
    except InterpolationResolutionError as err:  # run.py checks this first; Hydra driven another way lands here
        raise UserError(f"{str(err).strip().splitlines()[0]}; fix the ${{...}} reference or give a value") from None
    try:
        inputs = inputs_hash(fingerprint_inputs(cfg))
    except (UserError, OSError):
        return None  # a missing or unreadable input: the pipeline refuses it with its own message
    # the same hashes the pipeline stores in the record it writes (records.record_of)
    return find_record(cfg.results_dir, digest, inputs)


def discard_run_dir(run_dir: Path, reused: Path) -> bool:
    """Remove the folder Hydra made for a run that reuses a record, if it holds only Hydra's files.

    A run dir set by hand may be an existing run's folder (or the reused record's own): anything
    besides `.hydra/` and the job log keeps the folder where it is.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or Path(reused).resolve().is_relative_to(run_dir.resolve()):
        return False
    if any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir)
    return True
