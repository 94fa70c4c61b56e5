"""Is run B's perplexity really different from run A's? A paired bootstrap over eval windows.

Both runs evaluate the same windows of the same test split (same seqlen, tokenizer and data),
so the per-window losses pair up; resampling windows with replacement gives a confidence
interval for the PPL ratio B / A per dataset. A ratio whose interval contains 1 is a
difference the test split cannot resolve.

    python scripts/paired_ppl.py results/runs/<run A> results/runs/<run B> [--samples 10000]
    python scripts/paired_ppl.py <DynaMo run> <same run> --file-a window_nll_bq.json   # BQ vs BQ + DQS

Reads each run's `window_nll.json` (written beside `result.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

WINDOW_NLL_FILE = "window_nll.json"


def load_window_nll(run: Path, name: str = WINDOW_NLL_FILE) -> dict[str, np.ndarray]:
    path = run / name
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; re-run that configuration (runs before per-window "
                         "losses were recorded cannot be compared pairwise)")
    return {name: np.asarray(values, dtype=np.float64) for name, values in json.loads(path.read_text()).items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int, seed: int = 0) -> dict:
    """PPL ratio exp(mean(b) - mean(a)) with a 95% percentile interval; equal-length windows."""
    if a.shape != b.shape:
        raise SystemExit(f"error: the runs evaluated different windows ({len(a)} vs {len(b)}); "
                         "compare runs with the same eval.seqlen and eval.max_windows")
    diff = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    ratios = np.exp(diff[idx].mean(axis=1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ppl_a": float(np.exp(a.mean())), "ppl_b": float(np.exp(b.mean())), "ratio": float(np.exp(diff.mean())),
            "ci95": [float(low), float(high)], "b_better_windows": int((diff < 0).sum()), "windows": len(diff),
            "resolved": bool(high < 1.0 or low > 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument("--file-a", default=WINDOW_NLL_FILE,
                        help="run A's per-window file: window_nll_bq.json (BQ alone) or window_nll_fp16.json")
    parser.add_argument("--file-b", default=WINDOW_NLL_FILE)
    args = parser.parse_args(argv)
    a, b = load_window_nll(args.run_a, args.file_a), load_window_nll(args.run_b, args.file_b)
    rows = {name: paired_bootstrap(a[name], b[name], args.samples) for name in a if name in b}
    print(f"A = {args.run_a.name}/{args.file_a}\nB = {args.run_b.name}/{args.file_b}")
    print(f"{'dataset':<12}{'PPL A':>10}{'PPL B':>10}{'B/A':>9}{'95% CI':>20}{'B better':>12}  resolved")
    for name, r in rows.items():
        ci = f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
        print(f"{name:<12}{r['ppl_a']:>10.3f}{r['ppl_b']:>10.3f}{r['ratio']:>9.4f}{ci:>20}"
              f"{r['b_better_windows']:>7}/{r['windows']:<4}  {'yes' if r['resolved'] else 'no'}")
    if args.json:
        args.json.write_text(json.dumps({"run_a": f"{args.run_a}/{args.file_a}", "run_b": f"{args.run_b}/{args.file_b}",
                                         "datasets": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
