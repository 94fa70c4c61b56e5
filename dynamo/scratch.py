"""Temporary data that a later run can clean up when its owner died.

The KL reference pass stores every window's log-probs on disk (gigabytes on a paper model). A
run ended by SIGTERM or Ctrl-C removes them itself (run.py turns both into exceptions, so every
`with` block closes), but SIGKILL, an OOM kill or a power cut gives it no chance, and a folder from
`tempfile.mkdtemp` is never found again. So each process keeps its temporary data in one folder
named after its pid and start time, under one known root; every run first removes the folders of
processes that are gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ROOT_ENV = "DYNAMO_SCRATCH"  # where the per-process folders live (default: <system temp>/dynamo-scratch-<uid>)
_mine: Path | None = None


def scratch_root() -> Path:
    default = Path(tempfile.gettempdir()) / f"dynamo-scratch-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(os.environ.get(ROOT_ENV) or default)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _alive(name: str) -> bool:
    pid_text, _, started = name.partition("-")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's live process
    except (ValueError, OverflowError):
        return True   # not a folder of ours: leave it alone
    return not started or _start_time(pid) == started


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove the folders of processes that no longer run; returns what was removed."""
    root = scratch_root() if root is None else Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for folder in root.iterdir():
        if folder.is_dir() and not _alive(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.warning("removed %d temporary folder(s) left by runs that were killed: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    return removed


def process_dir() -> Path:
    """This process's scratch folder (made on first use, removed when the process exits normally)."""
    global _mine
    root = scratch_root()
    if _mine is None or not _mine.is_dir() or _mine.parent != root:
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale(root)
        _mine = root / f"{os.getpid()}-{_start_time(os.getpid())}"
        _mine.mkdir(exist_ok=True)
        atexit.register(shutil.rmtree, _mine, True)
    return _mine
