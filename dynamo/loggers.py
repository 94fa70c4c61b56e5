"""Mirror a finished run record to an experiment tracker (W&B), or to nothing.

Besides the metrics, a run logs its files as one `wandb.Artifact` (type "dynamo-run"): the
bit plan, the expert significance, and the per-window / per-question samples that paired
comparisons resample. `publish_tables` logs the tables of scripts/make_tables.py as an
Artifact (type "tables") and as `wandb.Table`s, readable in the W&B UI.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .config import LoggerBackend, LoggerConfig
from .errors import UserError
from .records import MC_CORRECT_FILE, WINDOW_FILES

log = logging.getLogger(__name__)

# Files beside result.json that a run's artifact carries, when present (see results/README.md).
RUN_ARTIFACT_FILES = ("plan.json", "significance.safetensors", "significance.json", *WINDOW_FILES.values(),
                      MC_CORRECT_FILE, "coverage.json")


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


def _wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb needs the wandb package (pip install wandb), or use logger=none") from None
    return wandb


def artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.' only (run ids of sweeps hold '/');
    the same keeps table keys (from headings with spaces, backticks, %) readable in the UI."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "unnamed"


def publish(record: dict, cfg: LoggerConfig, run_dir: Path) -> str | None:
    """Send the record's metrics and config, and its files as an artifact; returns where the tracker wrote it."""
    if cfg.backend == LoggerBackend.none:
        return None
    wandb = _wandb()
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=record["run_id"], dir=str(run_dir),
                     mode=cfg.mode.value, config=record["config"], tags=list(cfg.tags) or None,
                     job_type="eval", reinit="finish_previous")
    run.summary.update(flatten(record["metrics"], "metrics"))
    run.summary.update(flatten(record["timings"], "timings"))
    run.summary["config_hash"] = record["config_hash"]
    figures = sorted((Path(run_dir) / "figures").glob("*.png"))
    if figures:
        run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in figures})
    files = [Path(run_dir) / name for name in RUN_ARTIFACT_FILES if (Path(run_dir) / name).is_file()]
    if files:
        artifact = wandb.Artifact(artifact_name(f"run-{record['run_id']}"), type="dynamo-run",
                                  metadata={"config_hash": record["config_hash"], "run_id": record["run_id"]})
        for path in files:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
    location = run.dir
    run.finish()
    log.info("W&B (%s): %s", cfg.mode.value, location)
    return location


def markdown_tables(markdown: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{heading: (columns, rows)} of every Markdown table on a page, named by the headings above it."""
    tables, heading, block = {}, "table", []

    def flush():
        if block:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block
                     if not line.startswith("|---")]
            name, n = heading, 2
            while name in tables:
                name, n = f"{heading} ({n})", n + 1
            tables[name] = (cells[0], cells[1:])
            block.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            block.append(line)
            continue
        flush()
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
    flush()
    return tables


def publish_tables(paths: list[Path], cfg: LoggerConfig, wandb_dir: Path) -> str | None:
    """Log rendered tables (.md and .tex files) as one "tables" artifact, and each Markdown table as a
    wandb.Table under tables/<file>/<heading as a name>; returns where the tracker wrote the run."""
    if cfg.backend == LoggerBackend.none:
        return None
    wandb = _wandb()
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.project, entity=cfg.entity, dir=str(wandb_dir), mode=cfg.mode.value,
                     tags=list(cfg.tags) or None, job_type="tables", reinit="finish_previous")
    artifact = wandb.Artifact("tables", type="tables")
    logged = {}
    for path in paths:
        artifact.add_file(str(path), name=path.name)
        if path.suffix == ".md":
            for heading, (columns, rows) in markdown_tables(path.read_text()).items():
                logged[f"tables/{path.stem}/{artifact_name(heading)}"] = wandb.Table(columns=columns, data=rows)
    if logged:
        run.log(logged)
    run.log_artifact(artifact)
    location = run.dir
    run.finish()
    log.info("W&B tables (%s): %s", cfg.mode.value, location)
    return location
