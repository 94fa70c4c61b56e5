"""Checkpoint folders written whole or not at all."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..config import ModelConfig
from ..tokens import TRAINING_FILE


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):  # transformers writes weights 0600; an export is meant to be read, as records are
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


def nbytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(folder).glob(pattern))


def training_record(model_cfg: ModelConfig) -> Path | None:
    """The source checkpoint's training.json (scripts/train_embedded.py), if it has one. An export
    carries it so that a reloaded export is evaluated with the windows its weights were trained on
    (dynamo.tokens.bos_id_for reads it and refuses a model.bos_windows that disagrees)."""
    path = Path(str(model_cfg.path)).expanduser() / TRAINING_FILE
    return path if path.is_file() else None


def carry_training_record(training: Path | None, folder: Path) -> None:
    """Copy the source's training record (training_record) into an export folder being written."""
    if training is not None:
        shutil.copyfile(training, Path(folder) / training.name)
