"""Which run records feed a table: every result.json under a folder, and the newest per (model, quant preset)."""

from __future__ import annotations

import json
from pathlib import Path

MODELS = ("testbed-qwen-moe", "tiny-olmoe", "tiny-qwen-moe")  # the default (quantization-sensitive) first
HUB_MODELS = ("olmoe", "moe-girl", "qwen-moe", "deepseek-moe")  # the paper's models (Tables I-III)


def load_records(root: Path) -> list[dict]:
    """Every result.json under `root`, with its run folder relative to root (`_path`) and absolute (`_dir`)."""
    records = []
    for path in sorted(root.rglob("result.json")):
        record = json.loads(path.read_text())
        record["_path"] = str(path.parent.relative_to(root))
        record["_dir"] = str(path.parent.resolve())
        records.append(record)
    return records


def pick(records: list[dict], experiments: tuple[str, ...], presets: set[str] | None = None,
         models: tuple[str, ...] = MODELS) -> dict[tuple[str, str], dict]:
    """Newest record per (model, quant) among the runs of `experiments` (only `presets`, when given);
    ties broken by run id."""
    chosen = {}
    for r in records:
        if experiment_of(r) not in experiments or (presets is not None and r["quant"]["name"] not in presets) \
                or r["model"]["name"] not in models:
            continue
        key = (r["model"]["name"], r["quant"]["name"])
        if key not in chosen or (r["created_at"], r["_path"]) > (chosen[key]["created_at"], chosen[key]["_path"]):
            chosen[key] = r
    return chosen


def experiment_of(record: dict) -> str | None:
    for override in record.get("overrides", []):
        key, _, value = override.lstrip("+").partition("=")
        if key == "experiment":
            return value
    return None
