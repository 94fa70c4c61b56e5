"""Resident memory of a child process over time, and its peak in each pipeline stage (Linux).

scripts/dryrun.py runs `run.py` in a fresh process; GNU time gives that process's peak RSS, which
says how much but not where. RssSampler reads the process tree's VmRSS every `interval` seconds,
and stage_peaks() attributes each sample to the pipeline stage that was running: the stages and
their seconds come from the run's own record (`timings`, in pipeline order), anchored at the log
line that ends model loading (dynamo.models' "loaded ..."), so process start-up and imports do not
shift them. Untimed steps between stages (the DQS preparation after the analysis, figures) shift
the later boundaries by their seconds (the dry run records the preparation's: dqs_prepare_s), and a
stage shorter than the interval may have no sample of its own: the attribution is approximate to
that extent, the overall peak (GNU time) is exact.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from pathlib import Path

# the order in which dynamo/pipeline.py runs the stages it times (those after load_model_s)
STAGES = ("eval_ppl_fp16_s", "analysis_s", "calibration_s", "quantize_s", "eval_ppl_bq_s", "eval_ppl_s",
          "eval_stream_s", "lm_eval_s", "export_s")
LOADED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[dynamo\.models\]\[INFO\] - loaded ", re.M)


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of pid and its descendants (0 once they have exited)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) * 1024 if match else 0
        todo += [int(c) for c in children]
    return total


class RssSampler(threading.Thread):
    """(epoch seconds, tree RSS bytes) every `interval` seconds until stop()."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = tree_rss_bytes(self.pid)
            if rss:
                self.samples.append((time.time(), rss))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set()
        self.join()
        return self.samples


def loaded_at(log_text: str) -> float | None:
    """Epoch seconds of the log line that ends model loading (the logging timestamps are local time)."""
    match = LOADED.search(log_text)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def stage_peaks(samples: list[tuple[float, int]], anchor: float, timings: dict[str, float]) -> dict[str, int]:
    """Peak RSS bytes per stage: "load" (start-up, imports, data, model) up to `anchor`, then each
    timed stage of `timings` in pipeline order, and "other" for what follows the last of them
    (writing the record, and the tail that untimed steps pushed past the boundaries)."""
    bounds, t = [("load", anchor)], anchor
    for stage in STAGES:
        if stage in timings:
            t += timings[stage]
            bounds.append((stage.removesuffix("_s"), t))
    peaks: dict[str, int] = {}
    for when, rss in samples:
        name = next((n for n, end in bounds if when <= end), "other")
        peaks[name] = max(peaks.get(name, 0), rss)
    return peaks
