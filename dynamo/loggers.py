"""Mirror a finished run record to an experiment tracker (W&B), or to nothing."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import LoggerBackend, LoggerConfig
from .errors import UserError

log = logging.getLogger(__name__)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"ppl": {"code": 3.1}} -> {"ppl/code": 3.1}: W&B summary keys that match the record."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def publish(record: dict, cfg: LoggerConfig, run_dir: Path) -> str | None:
    """Send the record's metrics and config; returns where the tracker wrote it."""
    if cfg.backend == LoggerBackend.none:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb needs the wandb package (pip install wandb), or use logger=none") from None
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=record["run_id"], dir=str(run_dir),
                     mode=cfg.mode.value, config=record["config"], tags=list(cfg.tags) or None,
                     job_type="eval", reinit="finish_previous")
    run.summary.update(flatten(record["metrics"], "metrics"))
    run.summary.update(flatten(record["timings"], "timings"))
    run.summary["config_hash"] = record["config_hash"]
    figures = sorted((Path(run_dir) / "figures").glob("*.png"))
    if figures:
        run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in figures})
    location = run.dir
    run.finish()
    log.info("W&B (%s): %s", cfg.mode.value, location)
    return location
