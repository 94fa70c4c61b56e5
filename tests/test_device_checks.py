"""scripts/device_checks.sh --dry: every step of the GPU script on CPU at toy shapes, kernels interpreted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_checks.sh"


@pytest.mark.slow  # every GPU step at toy shapes, kernels interpreted: ~30 s of CPU
def test_dry_run_passes_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    compiled = json.loads((tmp_path / "kernels_compiled.json").read_text())
    assert compiled["compiled"] == 4 and compiled["failed"] == 0
    decode = json.loads((tmp_path / "decode-dry.json").read_text())
    assert decode["toy"] and all(r["tokens_per_s"] > 0 for r in decode["results"]["bq"].values())
    assert "all kernels match their references" in (tmp_path / "bench_kernels.log").read_text()


def test_gpu_steps_fit_in_ten_minutes():
    """The per-step time limits of the GPU run add up to less than the 600 s a device call may take."""
    text = SCRIPT.read_text()
    gpu_part = text.split('if [ "$DRY" = 1 ]', 1)[1].split("\nfi\n", 1)[1]
    limits = [int(s) for s in re.findall(r'step \w+ "\$\{\w+:-(\d+)\}"', gpu_part)]
    assert len(limits) == 5 and sum(limits) <= 580, limits
