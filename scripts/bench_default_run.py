"""Wall-clock cost of what a new user runs first: the README's `python run.py` (and, with --suite,
its test commands: the full suite and the fast tier), each in a fresh process, as they are run.

    python scripts/bench_default_run.py                 # ~5 min: python run.py logger=none
    python scripts/bench_default_run.py --suite         # + python -m pytest -q, and -m "not slow"
    python scripts/bench_default_run.py --no-run --suite-before 1070 --suite-before-source "CI at 18b699b"

Writes results/benchmarks/default_run.json (--out to change; entries it did not measure this time are kept).
--suite-before records the suite's time before a change (e.g. a new default model), measured
elsewhere, with where it comes from: the model card compares --suite with it.
The run writes to a fresh results_dir and analysis cache in a temporary folder, so no earlier
record or capture is reused: it pays what a fresh clone pays, less the W&B logger's offline
files (logger=none). Both commands get --threads as OMP_NUM_THREADS; on a machine shared with
another job the numbers are not comparable, so run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from dynamo.config import REPO_ROOT as REPO
from dynamo.records import write_json_atomic

OUT = REPO / "results" / "benchmarks" / "default_run.json"


def timed_command(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return round(time.perf_counter() - start, 1), proc


def run_default(env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        results_dir = Path(tmp) / "runs"
        cmd = [sys.executable, "run.py", f"results_dir={results_dir}", f"analysis.cache_dir={Path(tmp) / 'analysis'}",
               "logger=none"]
        seconds, proc = timed_command(cmd, env)
        if proc.returncode != 0:
            raise SystemExit(f"error: python run.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        (record_path,) = results_dir.rglob("result.json")
        record = json.loads(record_path.read_text())
    return {"command": "python run.py logger=none", "wall_s": seconds, "model": record["config"]["model"]["name"],
            "quant": record["quant"]["name"], "record_timings": record["timings"]}


# the record's key -> the pytest arguments after `python -m pytest -q`: the full suite (what CI runs) and
# the fast tier for daily work (tests marked slow left out; pyproject.toml's markers)
SUITES = {"suite": [], "suite_fast": ["-m", "not slow"]}


def run_suite(env: dict, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", *extra]
    seconds, proc = timed_command(cmd, env)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    command = " ".join(["python -m pytest -q", *(f'"{a}"' if " " in a else a for a in extra)])
    if proc.returncode != 0:
        raise SystemExit(f"error: {command} failed: {summary}")
    return {"command": command, "wall_s": seconds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="store_true",
                        help='also time the test commands: python -m pytest -q, and with -m "not slow"')
    parser.add_argument("--no-run", action="store_true", help="skip python run.py (with --suite: the suite only)")
    parser.add_argument("--suite-before", type=float, help="seconds the suite took before the change")
    parser.add_argument("--suite-before-source", help="where --suite-before was measured (commit, machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT, help=f"the JSON to update (default {OUT.relative_to(REPO)})")
    args = parser.parse_args()
    if (args.suite_before is None) != (args.suite_before_source is None):
        parser.error("--suite-before and --suite-before-source go together: a time says where it was measured")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    machine = {"threads": args.threads, "cpus": os.cpu_count(), "python": platform.python_version(),
               "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if not args.no_run:
        result["run"] = {**run_default(env), **machine}
        print(f"python run.py: {result['run']['wall_s']:.1f} s on {result['run']['model']}")
    if args.suite_before is not None:
        result["suite_before_testbed"] = {"wall_s": args.suite_before, "source": args.suite_before_source}
    if args.suite:
        for key, extra in SUITES.items():
            result[key] = {**run_suite(env, extra), **machine}
            print(f"{result[key]['command']}: {result[key]['wall_s']:.1f} s ({result[key]['summary']})")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
