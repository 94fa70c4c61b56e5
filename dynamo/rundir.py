"""Run folders that are unique and owned by the process that made them.

Two runs started in the same second used to share `<second>_<model>_<quant>_<tag>`: one record
overwrote the other, and a failing run's cleanup deleted the other's finished record. Now run.py
claims the folder before Hydra starts: the name carries milliseconds and a random part, and the
folder is made with os.mkdir (no exist_ok), so exactly one process gets it; a collision retries
with a new suffix. The claimed path travels to the job (and to launcher subprocesses) in an
environment variable, and cleanup removes only a folder this run claimed that holds no record.
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import datetime
from pathlib import Path

from .errors import UserError
from .records import RESULT_FILE

OWNED_ENV = "DYNAMO_OWNED_DIR"  # the folder run.py claimed (a run's folder, or a sweep's)
FAILED_FILE = "failed.json"     # a failed sweep job's error, beside the sweep's records
ATTEMPTS = 100


def stamp() -> str:
    """Local time to the millisecond plus 4 random hex digits: 2026-12-02_19-08-46-123-a1b2."""
    now = datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(2)}"


def claim(parent: Path, name: str) -> Path:
    """Create parent/<stamp>_<name> exclusively and return it; `name` may be empty (sweeps: sweep_<stamp>)."""
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create results folder {parent}: {err.strerror}; set results_dir=<a writable "
                        "folder>") from None
    for _ in range(ATTEMPTS):
        path = parent / (f"{stamp()}_{name}" if name else f"sweep_{stamp()}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue  # another run took this name in the same millisecond: draw a new suffix
        except OSError as err:
            raise UserError(f"cannot write to results_dir {parent}: {err.strerror}; set results_dir=<a writable "
                            "folder>") from None
        return path.resolve()
    raise UserError(f"could not create a unique run folder under {parent} in {ATTEMPTS} tries")


def check_writable(results_dir: str | Path) -> None:
    """The nearest existing folder of results_dir must be writable (Hydra's own mkdir would traceback)."""
    path = Path(results_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"results_dir={results_dir}: {existing} is a file, not a folder; set results_dir=<a folder>")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"results_dir={results_dir} is not writable ({existing} is read-only); "
                        "set results_dir=<a writable folder>")


def owned(run_dir: Path) -> bool:
    """Whether run_dir is the folder run.py claimed for this run, or a job folder inside a claimed sweep."""
    claimed = os.environ.get(OWNED_ENV)
    if not claimed:
        return False
    run_dir, claimed_dir = Path(run_dir).resolve(), Path(claimed).resolve()
    return run_dir == claimed_dir or run_dir.is_relative_to(claimed_dir)


def release(run_dir: Path) -> bool:
    """Remove a rejected run's folder, only if this run claimed it and no record was written in it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not owned(run_dir) or any(run_dir.rglob(RESULT_FILE)):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


# Config values that become part of a folder name: a separator or `..` there would put the run's
# files outside results_dir (a sweep with tag=x/../../victim/run1 overwrote another run's record).
NAMED_KEYS = ("tag", "quant.name", "model.name")


def check_folder_names(cfg) -> None:
    """Refuse folder-name parts that could leave results_dir: a path separator, `..`, or a NUL byte."""
    from omegaconf import OmegaConf

    for key in NAMED_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        text = "" if value is None else str(value)
        if "/" in text or "\\" in text or ".." in text or "\0" in text or (os.sep in text):
            raise UserError(f"{key}={text!r} would name a folder outside results_dir (it holds a path separator "
                            f"or '..'); use letters, digits, '-', '_' and single dots")


def check_contained(path: Path, root: Path, what: str) -> None:
    """`path` must resolve inside `root` (symlinks and `..` followed), else nothing is written there."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise UserError(f"{what} {path} resolves to {resolved}, outside {base}; nothing was written. Use a tag "
                        "without '/' or '..'")


def check_no_record(run_dir: Path) -> None:
    """A folder that already holds a finished record is never written into (it would be overwritten)."""
    if (Path(run_dir) / RESULT_FILE).exists():
        raise UserError(f"{run_dir} already holds a finished run's {RESULT_FILE}; it is never overwritten. "
                        "Choose another hydra.run.dir (or leave it out: run.py makes a new folder)")


def model_label(model_name: str, model_path: str | None, path_overridden: bool) -> str:
    """The model's name for a run folder: the checkpoint folder's name when model.path was given."""
    if path_overridden and model_path:
        name = Path(str(model_path).rstrip("/")).name
        if name and name not in (".", ".."):  # model.path=.. names no folder; the model's name stands in
            return name.replace(" ", "_")
    return model_name
