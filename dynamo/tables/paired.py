"""Is run B's perplexity really different from run A's? A paired bootstrap over eval windows.

Both runs evaluate the same windows of the same test split (same seqlen, tokenizer and data),
so the per-window losses pair up; `dynamo.stats` resamples windows (BCa, fixed seed) for a
95% confidence interval of the PPL ratio B / A per dataset. A ratio whose interval contains 1
is a difference the test split cannot resolve.

    python scripts/paired_ppl.py results/runs/<run A> results/runs/<run B> [--resamples 2000]
    python scripts/paired_ppl.py <DynaMo run> <same run> --file-a window_nll_bq.json   # BQ vs BQ + DQS

Reads each run's `window_nll.json` (written beside `result.json`). Exit status 2 with one
`error:` line when a file is missing or the runs evaluated different windows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .. import stats
from ..records import write_json_atomic


def compare(run_a: Path, run_b: Path, file_a: str, file_b: str, resamples: int) -> dict[str, dict]:
    """{dataset: PPL A, PPL B, the ratio's interval, windows where B is better}."""
    a, b = stats.load_samples(run_a, file_a), stats.load_samples(run_b, file_b)
    ratios = stats.compare_runs(run_a, run_b, file_a, file_b, n_resamples=resamples)
    return {name: {"ppl_a": float(np.exp(a[name].mean())), "ppl_b": float(np.exp(b[name].mean())),
                   **r.to_dict(), "b_better_windows": int((b[name] < a[name]).sum()), "resolved": r.excludes(1.0)}
            for name, r in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--resamples", type=int, default=stats.N_RESAMPLES)
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument("--file-a", default=stats.SAMPLE_FILES["ppl"],
                        help="run A's per-window file: window_nll_bq.json (BQ alone) or window_nll_fp16.json")
    parser.add_argument("--file-b", default=stats.SAMPLE_FILES["ppl"])
    args = parser.parse_args(argv)
    try:
        rows = compare(args.run_a, args.run_b, args.file_a, args.file_b, args.resamples)
    except (stats.MissingSamplesError, stats.PairingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"A = {args.run_a.name}/{args.file_a}\nB = {args.run_b.name}/{args.file_b}")
    print(f"{'dataset':<12}{'PPL A':>10}{'PPL B':>10}{'B/A':>9}{'95% CI':>20}{'B better':>12}  resolved")
    for name, r in rows.items():
        ci = f"[{r['low']:.4f}, {r['high']:.4f}]"
        print(f"{name:<12}{r['ppl_a']:>10.3f}{r['ppl_b']:>10.3f}{r['estimate']:>9.4f}{ci:>20}"
              f"{r['b_better_windows']:>7}/{r['n']:<4}  {'yes' if r['resolved'] else 'no'}")
    if args.json:
        write_json_atomic(args.json, {"run_a": f"{args.run_a}/{args.file_a}", "run_b": f"{args.run_b}/{args.file_b}",
                                      "datasets": rows})
    return 0
