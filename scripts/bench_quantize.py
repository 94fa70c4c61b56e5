"""Quantizer speed: seconds per million expert weights for RTN and GPTQ on this machine.

    python scripts/bench_quantize.py [--repeats 3]

Expert shapes of the embedded model and of OLMoE-1B-7B (gate/up [I, H], down [H, I]);
GPTQ gets a Hessian built from random correlated activations (its cost does not depend on
the values). Writes results/benchmarks/quantize_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dynamo.config import REPO_ROOT
from dynamo.quant import QSpec, quantize_gptq, quantize_rtn
from dynamo.records import device_info, package_versions, write_json_atomic

SHAPES = {"tiny-olmoe": (128, 256), "olmoe-1b-7b": (2048, 1024)}  # (hidden, expert intermediate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "quantize_speed.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    spec = QSpec(args.bits, group_size=128)
    rows = []
    for model, (hidden, inter) in SHAPES.items():
        for projection, (out_f, in_f) in {"gate_up": (inter, hidden), "down": (hidden, inter)}.items():
            w = torch.randn(out_f, in_f, generator=gen)
            x = torch.randn(4 * in_f, in_f, generator=gen) @ torch.randn(in_f, in_f, generator=gen) / in_f ** 0.5
            h = x.T @ x
            for method, fn in {"rtn": lambda: quantize_rtn(w, spec), "gptq": lambda: quantize_gptq(w, h, spec)}.items():
                fn()  # warm-up
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                seconds = statistics.median(times)
                rows.append({"model": model, "projection": projection, "shape": [out_f, in_f], "method": method,
                             "seconds": round(seconds, 5), "s_per_million_weights": round(seconds / (w.numel() / 1e6), 4)})
                print(f"{model:>12} {projection:>7} {out_f}x{in_f} {method:>4}: {rows[-1]['s_per_million_weights']:.3f} s/M")
    summary = {m: round(statistics.median(r["s_per_million_weights"] for r in rows if r["method"] == m), 4)
               for m in ("rtn", "gptq")}
    write_json_atomic(args.out, {
        "benchmark": "quantize_speed", "command": "python scripts/bench_quantize.py " + " ".join(sys.argv[1:]),
        "spec": spec.name, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "median_s_per_million_weights": summary, "rows": rows,
        "device": device_info(torch.device("cpu")), "versions": package_versions()})
    print(f"median s per million weights: {summary} -> {args.out}")


if __name__ == "__main__":
    main()
