"""The dry run's measurements: run.py in a fresh process (wall seconds, peak RSS, each stage's peak RSS), a
run.py call that must be refused with one error line, and GPTQ's seconds on one expert at the real shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..adapters import moe_layers
from ..config import REPO_ROOT
from ..quant import QSpec, quantize_gptq
from .extrapolate import GIB
from .rss import RssSampler, loaded_at, stage_peaks


def timed(cmd: list[str], log: Path, record: Path) -> dict:
    """Run cmd (run.py, writing `record`) in a fresh process: its wall seconds, its peak RSS (GNU time)
    and the peak RSS of each pipeline stage (sampled, dynamo/dryrun/rss.py)."""
    stats = log.with_suffix(".time")
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        sampler = RssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        samples = sampler.stop()
    wall = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed (exit {rc}); see {log}")
    out = {"wall_s": round(wall, 2), "peak_rss_gib": round(int(stats.read_text().split()[-1]) * 1024 / GIB, 3)}
    anchor = loaded_at(log.read_text(errors="replace"))
    if anchor is not None and samples:
        peaks = stage_peaks(samples, anchor, json.loads(record.read_text())["timings"])
        out["peak_rss_gib_by_stage"] = {stage: round(b / GIB, 3) for stage, b in peaks.items()}
        out["rss_sample_interval_s"] = sampler.interval
    return out


def refusal(cmd: list[str], log: Path) -> str:
    """Run cmd, which must stop with run.py's bad-input exit (2) and one `error:` line; that line."""
    with log.open("w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    if rc != 2 or len(errors) != 1:
        sys.exit(f"error: expected the packed export to refuse ModuleList experts (exit 2, one error line), got "
                 f"exit {rc}; see {log}. If the export now supports them, drop the remote-code special case here")
    return errors[0]


def gptq_seconds(model, bits: int = 4) -> dict:
    """Median-free single timing of GPTQ on one routed expert's matrices at the real shapes."""
    layer = next(iter(moe_layers(model)))
    spec, gen, out = QSpec(bits, group_size=128), torch.Generator().manual_seed(0), {}
    for projection in ("gate", "up", "down"):
        w = layer.weight(0, projection).float()
        x = torch.randn(2 * w.shape[1], w.shape[1], generator=gen)
        h = x.T @ x
        quantize_gptq(w[:8], h, spec)  # warm-up (allocations)
        t = time.perf_counter()
        quantize_gptq(w, h, spec)
        out[projection] = round(time.perf_counter() - t, 3)
    return out
